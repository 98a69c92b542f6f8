// The module body shared by calibra._cpu and calibra._cuda: build facts, the thread setting, and
// every family's bindings registered through CALIBRA_BINDINGS.
#include <utility>

#include "binding.h"
#include "calibra/parallel.h"

#ifdef CALIBRA_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace calibra {
namespace bind {

namespace {
std::vector<std::pair<std::string, Binder>>& binders() {
  static std::vector<std::pair<std::string, Binder>> list;
  return list;
}
}  // namespace

int add_binder(const char* family, Binder fn) {
  binders().emplace_back(family, std::move(fn));
  return static_cast<int>(binders().size());
}

void throw_if_error(const Status& st) {
  switch (st.code) {
    case StatusCode::kOk: return;
    case StatusCode::kInvalidArgument:
    case StatusCode::kNonFinite: throw py::value_error(st.message);
    case StatusCode::kUnsupported: PyErr_SetString(PyExc_NotImplementedError, st.message.c_str()); throw py::error_already_set();
    case StatusCode::kDeviceError: throw std::runtime_error(st.message);
  }
  throw std::runtime_error(st.message);
}

}  // namespace bind
}  // namespace calibra

#define CALIBRA_STR2(x) #x
#define CALIBRA_STR(x) CALIBRA_STR2(x)

PYBIND11_MODULE(CALIBRA_MODULE_NAME, m) {
  m.doc() = "calibra native kernels (torch-free; tensors cross as (ptr, shape, strides, dtype) tuples)";
  m.def("set_num_threads", &calibra::set_num_threads, "Threads used by the CPU kernels.");
  m.def("num_threads", &calibra::num_threads);
  py::dict info;
  info["module"] = CALIBRA_STR(CALIBRA_MODULE_NAME);
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#endif
#ifdef CALIBRA_WITH_CUDA
  info["cuda_runtime"] = CUDART_VERSION;
#endif
  py::list families;
  for (auto& [family, fn] : calibra::bind::binders()) {
    fn(m);
    families.append(family);
  }
  info["families"] = families;
  m.attr("BUILD_INFO") = info;
}
