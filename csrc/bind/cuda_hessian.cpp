#include "binding.h"
#include "calibra/params/hessian.h"

CALIBRA_BINDINGS(hessian) {
  m.def(
      "hessian_accumulate",
      [](calibra::TensorArg H, calibra::TensorArg x, uintptr_t stream) {
        calibra::HessianParams p{H, x};
        calibra::bind::call_released(
            [&] { return calibra::hessian_accumulate_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("H"), py::arg("x"), py::arg("stream"));
}
