#include "binding.h"
#include "calibra/params/hadamard.h"

CALIBRA_BINDINGS(hadamard) {
  m.def(
      "hadamard",
      [](calibra::TensorArg x, int64_t block_size, calibra::TensorArg out, uintptr_t stream) {
        calibra::HadamardParams p{x, out, block_size};
        calibra::bind::call_released([&] { return calibra::hadamard_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("x"), py::arg("block_size"), py::arg("out"), py::arg("stream"));
}
