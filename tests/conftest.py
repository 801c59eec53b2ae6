"""Test setup: on a machine without CUDA the Triton kernels run under the Triton interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, hence here, at the top.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# (device, backend) pairs every op test runs on: the C++ kernels, the PyTorch reference and the Triton kernels on
# CPU (interpreter); on CUDA the default dispatch (Triton).
DEVICE_BACKENDS = [("cpu", "cpp"), ("cpu", "reference"), ("cpu", "triton")]
if torch.cuda.is_available():
    DEVICE_BACKENDS.append(("cuda", "auto"))


@pytest.fixture(params=DEVICE_BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def device_backend(request):
    from scm_fast.ops import use_backend
    device, name = request.param
    with use_backend(name):
        yield device, name
