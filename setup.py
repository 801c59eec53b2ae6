"""Builds scm_fast (Python), scm_fast.kernels (Triton, from kernels/) and scm_fast._C (C++)."""
import glob

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ext = CppExtension(
    "scm_fast._C",
    sorted(glob.glob("csrc/*.cpp")),
    extra_compile_args=["-O3", "-std=c++17", "-fopenmp"],
    extra_link_args=["-fopenmp"],
)

setup(
    packages=["scm_fast", "scm_fast.ops", "scm_fast.kernels"],
    package_dir={"scm_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
