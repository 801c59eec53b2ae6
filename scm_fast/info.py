"""python -m scm_fast.info: versions, how the extension was built, and which backend runs each op."""
import platform
import sys


def collect():
    import numpy
    import torch

    import scm_fast
    from scm_fast.ops import _registry
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {
        "scm_fast": scm_fast.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "cuda available": torch.cuda.is_available(),
        "torch threads": torch.get_num_threads(),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "backend (SCM_FAST_BACKEND)": _registry.backend(),
    }
    if torch.cuda.is_available():
        info["cuda device"] = torch.cuda.get_device_name()
    if _registry._C is None:
        info["extension scm_fast._C"] = f"not built ({_registry.BUILD_HINT})"
    else:
        for key, value in _registry._C.build_info().items():
            info[f"_C {key}"] = value
    return info, _registry.describe()


def main():
    info, ops = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print(f"\n{'op':<22} {'cpu':<32} {'cuda':<10} route")
    for name, where in ops.items():
        print(f"{name:<22} {where['cpu']:<32} {where['cuda']:<10} {where['route']}")


if __name__ == "__main__":
    main()
