// scm_fast._C: the Python module that carries the op library (loading it runs the TORCH_LIBRARY
// registrations of the other translation units) and reports how it was built.
#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>

#include <string>

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

std::string cpu_isa() {
#if defined(__AVX512F__)
  return "avx512f";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "baseline";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "scm_fast C++ extension: op schemas and build information";
  m.def("build_info", []() {
    pybind11::dict info;
    info["compiler"] = compiler();
    info["cpu_isa"] = cpu_isa();
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["num_threads"] = at::get_num_threads();
    return info;
  });
}
