#include "binding.h"
#include "calibra/params/sparsity.h"

CALIBRA_BINDINGS(sparsity) {
  m.def(
      "nm_mask",
      [](calibra::TensorArg scores, int64_t n, int64_t mm, calibra::TensorArg out) {
        calibra::NmMaskParams p;
        p.scores = scores;
        p.out = out;
        p.n = n;
        p.m = mm;
        calibra::bind::call_released([&] { return calibra::nm_mask_cpu(p); });
      },
      py::arg("scores"), py::arg("n"), py::arg("m"), py::arg("out"),
      "out = keep the n largest of every m scores along the last dim (see params/sparsity.h).");
  m.def(
      "compress_24",
      [](calibra::TensorArg w, calibra::TensorArg values, calibra::TensorArg meta) {
        calibra::Compress24Params p;
        p.w = w;
        p.values = values;
        p.meta = meta;
        calibra::bind::call_released([&] { return calibra::compress_24_cpu(p); });
      },
      py::arg("w"), py::arg("values"), py::arg("meta"), "(values, meta) = 2:4 compression of w (see params/sparsity.h).");
  m.def(
      "decompress_24",
      [](calibra::TensorArg values, calibra::TensorArg meta, calibra::TensorArg out) {
        calibra::Decompress24Params p;
        p.values = values;
        p.meta = meta;
        p.out = out;
        calibra::bind::call_released([&] { return calibra::decompress_24_cpu(p); });
      },
      py::arg("values"), py::arg("meta"), py::arg("out"), "out = dense matrix of 2:4 (values, meta).");
}
