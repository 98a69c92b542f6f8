// Shared by every binding file of calibra._cpu and calibra._cuda.
//
// A TensorArg crosses from Python as the 4-tuple (data_ptr, shape, strides, dtype_code) built by
// calibra._native.tensor_arg(); the caster below turns it into calibra::TensorArg. Each op family
// registers its functions with CALIBRA_BINDINGS(name) { ... } in its own cpu_<family>.cpp or
// cuda_<family>.cpp, so adding a family never edits a shared file.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <string>
#include <vector>

#include "calibra/status.h"
#include "calibra/tensor_arg.h"

namespace py = pybind11;

namespace pybind11 {
namespace detail {
template <>
struct type_caster<calibra::TensorArg> {
  PYBIND11_TYPE_CASTER(calibra::TensorArg, const_name("TensorArg"));
  bool load(handle src, bool) {
    if (!isinstance<tuple>(src)) return false;
    auto t = reinterpret_borrow<tuple>(src);
    if (t.size() != 4) return false;
    auto shape = t[1].cast<std::vector<int64_t>>();
    auto strides = t[2].cast<std::vector<int64_t>>();
    if (shape.size() != strides.size() || shape.size() > static_cast<size_t>(calibra::kMaxDims)) return false;
    value.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
    value.ndim = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) {
      value.shape[i] = shape[i];
      value.strides[i] = strides[i];
    }
    value.dtype = static_cast<calibra::DType>(t[3].cast<int>());
    return true;
  }
};
}  // namespace detail
}  // namespace pybind11

namespace calibra {
namespace bind {

// Raise the Python exception that matches a failed Status (ValueError / NotImplementedError / RuntimeError).
void throw_if_error(const Status& st);

// Runs a kernel entry point without the GIL (other Python threads keep going while a kernel runs),
// then raises its Status as a Python exception.
template <class F>
void call_released(F&& kernel) {
  Status st;
  {
    py::gil_scoped_release nogil;
    st = kernel();
  }
  throw_if_error(st);
}

using Binder = std::function<void(py::module_&)>;
int add_binder(const char* family, Binder fn);

}  // namespace bind
}  // namespace calibra

#define CALIBRA_BINDINGS_CAT2(a, b) a##b
#define CALIBRA_BINDINGS_CAT(a, b) CALIBRA_BINDINGS_CAT2(a, b)
// CALIBRA_BINDINGS(quantize) { m.def(...); }  -- registers this file's functions on the module.
#define CALIBRA_BINDINGS(family)                                                       \
  static void CALIBRA_BINDINGS_CAT(calibra_bind_, family)(py::module_ & m);            \
  static const int CALIBRA_BINDINGS_CAT(calibra_binder_registered_, family) =          \
      ::calibra::bind::add_binder(#family, &CALIBRA_BINDINGS_CAT(calibra_bind_, family)); \
  static void CALIBRA_BINDINGS_CAT(calibra_bind_, family)(py::module_ & m)
