"""Which implementation runs each fused op.

The schemas live in C++ (csrc/, `TORCH_LIBRARY(scm_fast, m)`); this module registers the
implementations against them: the Triton kernels for CUDA, and on CPU the backend chosen by
`SCM_FAST_BACKEND` (or `use_backend`):
  auto       the C++ CPU kernels (csrc/, ops `<name>_cpu`) for fp32/fp16/bf16; fp64 and a source
             checkout without the extension use the reference
  cpp        the C++ CPU kernels, or an error where they do not apply
  reference  the PyTorch reference (attention: key-chunked), on every device
  triton     the Triton kernels, also for CPU tensors under the interpreter (TRITON_INTERPRET=1
             must be set before scm_fast is imported); this is how the GPU code is tested on CPU
Every call from the autograd.Functions goes through `call`, i.e. through `torch.ops.scm_fast.*`,
so the kernels also run under torch.func transforms (which hand the dispatcher plain tensors).
Without the compiled extension `call` runs the same Python implementations directly.
"""
import contextlib
import os
import warnings

import torch

BACKENDS = ("auto", "cpp", "reference", "triton")
BUILD_HINT = "pip install -e . --no-build-isolation"


def _checked(name):
    if name not in BACKENDS:
        raise ValueError(f"SCM_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


_state = {"backend": _checked(os.environ.get("SCM_FAST_BACKEND", "auto"))}

try:
    from scm_fast import _C
except ImportError as exc:  # a source checkout that was never built
    _C = None
    warnings.warn(f"scm_fast._C is not built ({exc}); fused ops run the PyTorch reference. "
                  f"Build it with: {BUILD_HINT}", RuntimeWarning, stacklevel=2)

_lib = torch.library.Library("scm_fast", "IMPL") if _C is not None else None
_calls = {}


def backend():
    return _state["backend"]


def set_backend(name):
    _state["backend"] = _checked(name)


@contextlib.contextmanager
def use_backend(name):
    """Run the block with another backend, e.g. `with use_backend("triton"): ...`."""
    old = backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _triton_for_cpu(name, fn):
    def run(*args):
        from scm_fast.kernels import attention as k
        if not k.INTERPRET:
            raise RuntimeError(f"scm_fast.{name}: the triton backend on CPU tensors needs "
                               "TRITON_INTERPRET=1 in the environment before scm_fast is imported")
        return fn(*args)
    return run


def define(name, reference, triton_fn, fake):
    """Register `name`'s implementations: reference (torch ops), triton (kernel launcher), fake."""
    def cpu_impl(*args):
        chosen = backend()
        if chosen == "triton":
            return _triton_for_cpu(name, triton_fn)(*args)
        fp64 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args)
        if chosen in ("auto", "cpp") and _C is not None and not fp64:
            return getattr(torch.ops.scm_fast, name + "_cpu")(*args)
        if chosen == "cpp":
            raise TypeError(f"scm_fast.{name}: the cpp backend needs the built extension and "
                            f"fp32/fp16/bf16 inputs, got {[a.dtype for a in args if isinstance(a, torch.Tensor)]}")
        return reference(*args)

    def cuda_impl(*args):
        return reference(*args) if backend() == "reference" else triton_fn(*args)

    if _C is None:
        _calls[name] = lambda *args: (cuda_impl if args[0].is_cuda else cpu_impl)(*args)
        return
    _lib.impl(name, cpu_impl, "CPU")
    _lib.impl(name, cuda_impl, "CUDA")
    torch.library.register_fake(f"scm_fast::{name}", fake, lib=_lib)
    torch.library.register_fake(f"scm_fast::{name}_cpu", fake, lib=_lib)
    _calls[name] = getattr(torch.ops.scm_fast, name)


def call(name, *args):
    return _calls[name](*args)


def describe():
    """{op: {device: implementation}} for the current backend, as `python -m scm_fast.info` shows."""
    cpp = "cpp (C++ kernels)" if _C is not None else "reference (no _C)"
    cpu = {"auto": cpp, "cpp": cpp, "reference": "reference (PyTorch)", "triton": "triton (interpreter)"}[backend()]
    cuda = "reference (PyTorch)" if backend() == "reference" else "triton"
    route = "torch.ops.scm_fast (C++ schema)" if _C is not None else "direct Python call (no _C)"
    return {name: {"cpu": cpu, "cuda": cuda, "route": route} for name in _calls}
