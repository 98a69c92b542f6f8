#include "binding.h"
#include "calibra/params/pack.h"

// `word` (a torch.dtype) is passed through by the generic adapter; the out tensor's dtype is what the
// kernel uses, so it is accepted and ignored here.
CALIBRA_BINDINGS(pack) {
  m.def(
      "pack",
      [](calibra::TensorArg codes, int64_t bits, int64_t dim, py::object /*word*/, calibra::TensorArg out) {
        calibra::PackParams p;
        p.codes = codes;
        p.out = out;
        p.bits = bits;
        p.dim = dim < 0 ? dim + 2 : dim;
        calibra::bind::call_released([&] { return calibra::pack_cpu(p); });
      },
      py::arg("codes"), py::arg("bits"), py::arg("dim"), py::arg("word"), py::arg("out"),
      "out = codes packed into words along dim (see params/pack.h).");
  m.def(
      "unpack",
      [](calibra::TensorArg words, int64_t bits, int64_t dim, int64_t length, calibra::TensorArg out) {
        calibra::UnpackParams p;
        p.words = words;
        p.out = out;
        p.bits = bits;
        p.dim = dim < 0 ? dim + 2 : dim;
        p.length = length;
        calibra::bind::call_released([&] { return calibra::unpack_cpu(p); });
      },
      py::arg("words"), py::arg("bits"), py::arg("dim"), py::arg("length"), py::arg("out"),
      "out = the codes of words (inverse of pack; see params/pack.h).");
}
