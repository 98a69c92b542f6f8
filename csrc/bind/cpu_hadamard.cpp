#include "binding.h"
#include "calibra/params/hadamard.h"

CALIBRA_BINDINGS(hadamard) {
  m.def(
      "hadamard",
      [](calibra::TensorArg x, int64_t block_size, calibra::TensorArg out) {
        calibra::HadamardParams p{x, out, block_size};
        calibra::bind::call_released([&] { return calibra::hadamard_cpu(p); });
      },
      py::arg("x"), py::arg("block_size"), py::arg("out"),
      "out = blockwise normalized Walsh-Hadamard transform of x (see params/hadamard.h).");
}
