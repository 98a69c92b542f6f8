#include "binding.h"
#include "calibra/params/sparsity.h"

// Every op of this family has data errors (NaN, not 2:4, bad metadata), reported through `err`, the
// data-error flag the registry passes to ops declared with @cuda_data_error (python/calibra/ops/_registry.py).
CALIBRA_BINDINGS(sparsity) {
  m.def(
      "nm_mask",
      [](calibra::TensorArg scores, int64_t n, int64_t mm, calibra::TensorArg out, calibra::TensorArg err, uintptr_t stream) {
        calibra::NmMaskParams p;
        p.scores = scores;
        p.out = out;
        p.n = n;
        p.m = mm;
        p.err = err;
        calibra::bind::call_released([&] { return calibra::nm_mask_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("scores"), py::arg("n"), py::arg("m"), py::arg("out"), py::arg("err"), py::arg("stream"));
  m.def(
      "compress_24",
      [](calibra::TensorArg w, calibra::TensorArg values, calibra::TensorArg meta, calibra::TensorArg err, uintptr_t stream) {
        calibra::Compress24Params p;
        p.w = w;
        p.values = values;
        p.meta = meta;
        p.err = err;
        calibra::bind::call_released([&] { return calibra::compress_24_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("w"), py::arg("values"), py::arg("meta"), py::arg("err"), py::arg("stream"));
  m.def(
      "decompress_24",
      [](calibra::TensorArg values, calibra::TensorArg meta, calibra::TensorArg out, calibra::TensorArg err, uintptr_t stream) {
        calibra::Decompress24Params p;
        p.values = values;
        p.meta = meta;
        p.out = out;
        p.err = err;
        calibra::bind::call_released([&] { return calibra::decompress_24_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("values"), py::arg("meta"), py::arg("out"), py::arg("err"), py::arg("stream"));
}
