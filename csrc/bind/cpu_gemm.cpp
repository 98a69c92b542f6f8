#include "binding.h"
#include "calibra/params/gemm.h"

#include <optional>

CALIBRA_BINDINGS(gemm) {
  m.def("gemm_split_k", &calibra::gemm_split_k, py::arg("m"), py::arg("n"), py::arg("k"), py::arg("sms"),
        py::arg("n_tile"), py::arg("m_tile_min"), "K slices of a CUDA GEMM (see params/gemm.h gemm_split_k).");
  m.attr("W4A16_N_TILE") = calibra::kW4A16BlockN;
  m.attr("W4A16_M_TILE_MIN") = calibra::kW4A16MinRows;
  m.attr("SPARSE24_N_TILE") = calibra::kSparse24BlockN;
  m.attr("SPARSE24_M_TILE_MIN") = calibra::kSparse24MinRows;
  m.def(
      "w4a16_repack",
      [](calibra::TensorArg qweight, calibra::TensorArg out) {
        calibra::W4A16RepackParams p{qweight, out};
        calibra::bind::call_released([&] { return calibra::w4a16_repack_cpu(p); });
      },
      py::arg("qweight"), py::arg("out"), "out = the W4A16 tile layout of qweight (see params/gemm.h).");
  m.def(
      "w4a16_gemm",
      [](calibra::TensorArg x, calibra::TensorArg tiled, calibra::TensorArg scales, std::optional<calibra::TensorArg> zeros,
         int64_t group, calibra::TensorArg out) {
        calibra::W4A16GemmParams p{x, tiled, scales, zeros.value_or(calibra::TensorArg{}), group, out, {}};
        calibra::bind::call_released([&] { return calibra::w4a16_gemm_cpu(p); });
      },
      py::arg("x"), py::arg("tiled"), py::arg("scales"), py::arg("zeros").none(true), py::arg("group"), py::arg("out"),
      "out = x @ dequant(W)^T (see params/gemm.h).");
  m.def(
      "sparse24_reorder_meta",
      [](calibra::TensorArg meta, calibra::TensorArg out) {
        calibra::Sparse24ReorderMetaParams p{meta, out};
        calibra::bind::call_released([&] { return calibra::sparse24_reorder_meta_cpu(p); });
      },
      py::arg("meta"), py::arg("out"), "out = compress_24 metadata in mma.sp register order (see params/gemm.h).");
  m.def(
      "sparse24_gemm",
      [](calibra::TensorArg x, calibra::TensorArg values, calibra::TensorArg meta, calibra::TensorArg out) {
        calibra::Sparse24GemmParams p{x, values, meta, out, {}};
        calibra::bind::call_released([&] { return calibra::sparse24_gemm_cpu(p); });
      },
      py::arg("x"), py::arg("values"), py::arg("meta"), py::arg("out"), "out = x @ W^T for 2:4-sparse W (see params/gemm.h).");
}
