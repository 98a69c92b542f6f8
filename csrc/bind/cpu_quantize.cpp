#include <string>

#include "quantize_binding.h"

using calibra_bind::fp4_format;

CALIBRA_BINDINGS(quantize) {
  using calibra::TensorArg;
  m.def(
      "quantize_int",
      [](TensorArg w, int64_t bits, int64_t group_size, bool symmetric, TensorArg codes, TensorArg scales, TensorArg zeros) {
        calibra::QuantizeIntParams p{w, codes, scales, zeros, bits, group_size, symmetric, {}};
        calibra::bind::call_released([&] { return calibra::quantize_int_cpu(p); });
      },
      py::arg("w"), py::arg("bits"), py::arg("group_size"), py::arg("symmetric"), py::arg("codes"), py::arg("scales"),
      py::arg("zeros"), "Integer RTN quantization (see params/quantize.h).");
  m.def(
      "dequantize_int",
      [](TensorArg codes, TensorArg scales, TensorArg zeros, int64_t group_size, py::object /*dtype*/, TensorArg out) {
        calibra::DequantizeIntParams p{codes, scales, zeros, out, group_size};
        calibra::bind::call_released([&] { return calibra::dequantize_int_cpu(p); });
      },
      py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("dtype"), py::arg("out"));
  m.def(
      "quantize_fp4",
      [](TensorArg w, const std::string& format, TensorArg codes, TensorArg scales, TensorArg global_scale) {
        calibra::QuantizeFp4Params p{w, codes, scales, global_scale, fp4_format(format), {}};
        calibra::bind::call_released([&] { return calibra::quantize_fp4_cpu(p); });
      },
      py::arg("w"), py::arg("format"), py::arg("codes"), py::arg("scales"), py::arg("global_scale"));
  m.def(
      "dequantize_fp4",
      [](TensorArg codes, TensorArg scales, TensorArg global_scale, const std::string& format, py::object /*dtype*/,
         TensorArg out) {
        calibra::DequantizeFp4Params p{codes, scales, global_scale, out, fp4_format(format)};
        calibra::bind::call_released([&] { return calibra::dequantize_fp4_cpu(p); });
      },
      py::arg("codes"), py::arg("scales"), py::arg("global_scale"), py::arg("format"), py::arg("dtype"), py::arg("out"));
  m.def(
      "float_to_e4m3",
      [](TensorArg x, TensorArg out) { calibra::bind::call_released([&] { return calibra::float_to_e4m3_cpu(x, out); }); },
      py::arg("x"), py::arg("out"), "Test hook: float32 -> float8_e4m3fn bits with the kernels' rounding.");
}
