#include "binding.h"
#include "calibra/params/hessian.h"

CALIBRA_BINDINGS(hessian) {
  m.def(
      "hessian_accumulate",
      [](calibra::TensorArg H, calibra::TensorArg x) {
        calibra::HessianParams p{H, x};
        calibra::bind::call_released([&] { return calibra::hessian_accumulate_cpu(p); });
      },
      py::arg("H"), py::arg("x"), "H += X^T X in place, lower triangle computed and mirrored (see params/hessian.h).");
  m.def("hessian_accumulate_isa", &calibra::hessian_accumulate_cpu_isa,
        "The micro-kernel ISA hessian_accumulate uses on this CPU (avx512, avx2 or portable).");
}
