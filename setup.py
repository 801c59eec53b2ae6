"""Builds scm_fast (Python), scm_fast.kernels (Triton, from kernels/) and scm_fast._C (C++).

The C++ CPU kernels are compiled for the building machine's vector unit (AVX2 + FMA on x86-64
where /proc/cpuinfo shows them); SCM_FAST_PORTABLE=1 builds for the baseline ISA instead.
SCM_FAST_ASAN=1 adds AddressSanitizer (`make asan` builds that way, runs the C++ kernel tests, and
builds the normal extension again).
"""
import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def isa_flags():
    if os.environ.get("SCM_FAST_PORTABLE") == "1" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= flags else []


ASAN = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"] if os.environ.get("SCM_FAST_ASAN") == "1" else []

ext = CppExtension(
    "scm_fast._C",
    sorted(glob.glob("csrc/*.cpp")),
    extra_compile_args=["-O3", "-std=c++17", "-fopenmp", *isa_flags(), *ASAN],
    extra_link_args=["-fopenmp", *ASAN],
)

setup(
    packages=["scm_fast", "scm_fast.interop", "scm_fast.models", "scm_fast.ops", "scm_fast.train", "scm_fast.kernels"],
    package_dir={"scm_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
