#include "binding.h"
#include "calibra/params/pack.h"

// pack reports codes >= 2^bits through `err`, the registry's data-error flag (@cuda_data_error in
// python/calibra/ops/pack.py); unpack has no data errors and takes no flag.
CALIBRA_BINDINGS(pack) {
  m.def(
      "pack",
      [](calibra::TensorArg codes, int64_t bits, int64_t dim, py::object /*word*/, calibra::TensorArg out,
         calibra::TensorArg err, uintptr_t stream) {
        calibra::PackParams p;
        p.codes = codes;
        p.out = out;
        p.bits = bits;
        p.dim = dim < 0 ? dim + 2 : dim;
        p.err = err;
        calibra::bind::call_released([&] { return calibra::pack_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("codes"), py::arg("bits"), py::arg("dim"), py::arg("word"), py::arg("out"), py::arg("err"), py::arg("stream"));
  m.def(
      "unpack",
      [](calibra::TensorArg words, int64_t bits, int64_t dim, int64_t length, calibra::TensorArg out, uintptr_t stream) {
        calibra::UnpackParams p;
        p.words = words;
        p.out = out;
        p.bits = bits;
        p.dim = dim < 0 ? dim + 2 : dim;
        p.length = length;
        calibra::bind::call_released([&] { return calibra::unpack_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("words"), py::arg("bits"), py::arg("dim"), py::arg("length"), py::arg("out"), py::arg("stream"));
}
