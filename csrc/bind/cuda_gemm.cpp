#include "binding.h"
#include "calibra/params/gemm.h"

#include <optional>

// The GEMMs take one more (optional) tensor after their output: the split-K workspace that
// calibra/ops/gemm.py allocates (None when K is not split).
CALIBRA_BINDINGS(gemm) {
  m.def(
      "w4a16_repack",
      [](calibra::TensorArg qweight, calibra::TensorArg out, uintptr_t stream) {
        calibra::W4A16RepackParams p{qweight, out};
        calibra::bind::call_released([&] { return calibra::w4a16_repack_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("qweight"), py::arg("out"), py::arg("stream"));
  m.def(
      "w4a16_gemm",
      [](calibra::TensorArg x, calibra::TensorArg tiled, calibra::TensorArg scales, std::optional<calibra::TensorArg> zeros,
         int64_t group, calibra::TensorArg out, std::optional<calibra::TensorArg> workspace, uintptr_t stream) {
        calibra::W4A16GemmParams p{x, tiled, scales, zeros.value_or(calibra::TensorArg{}), group, out,
                                   workspace.value_or(calibra::TensorArg{})};
        calibra::bind::call_released([&] { return calibra::w4a16_gemm_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("x"), py::arg("tiled"), py::arg("scales"), py::arg("zeros").none(true), py::arg("group"), py::arg("out"),
      py::arg("workspace").none(true), py::arg("stream"));
  m.def(
      "sparse24_reorder_meta",
      [](calibra::TensorArg meta, calibra::TensorArg out, uintptr_t stream) {
        calibra::Sparse24ReorderMetaParams p{meta, out};
        calibra::bind::call_released([&] { return calibra::sparse24_reorder_meta_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("meta"), py::arg("out"), py::arg("stream"));
  m.def(
      "sparse24_gemm",
      [](calibra::TensorArg x, calibra::TensorArg values, calibra::TensorArg meta, calibra::TensorArg out,
         std::optional<calibra::TensorArg> workspace, uintptr_t stream) {
        calibra::Sparse24GemmParams p{x, values, meta, out, workspace.value_or(calibra::TensorArg{})};
        calibra::bind::call_released([&] { return calibra::sparse24_gemm_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("out"), py::arg("workspace").none(true), py::arg("stream"));
}
