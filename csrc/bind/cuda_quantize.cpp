#include <string>

#include "quantize_binding.h"

using calibra_bind::fp4_format;

CALIBRA_BINDINGS(quantize) {
  using calibra::TensorArg;
  m.def(
      "quantize_int",
      [](TensorArg w, int64_t bits, int64_t group_size, bool symmetric, TensorArg codes, TensorArg scales, TensorArg zeros,
         TensorArg err, uintptr_t stream) {
        calibra::QuantizeIntParams p{w, codes, scales, zeros, bits, group_size, symmetric, err};
        calibra::bind::call_released([&] { return calibra::quantize_int_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("w"), py::arg("bits"), py::arg("group_size"), py::arg("symmetric"), py::arg("codes"), py::arg("scales"),
      py::arg("zeros"), py::arg("err"), py::arg("stream"), "Integer RTN quantization (see params/quantize.h).");
  m.def(
      "dequantize_int",
      [](TensorArg codes, TensorArg scales, TensorArg zeros, int64_t group_size, py::object /*dtype*/, TensorArg out, uintptr_t stream) {
        calibra::DequantizeIntParams p{codes, scales, zeros, out, group_size};
        calibra::bind::call_released([&] { return calibra::dequantize_int_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("group_size"), py::arg("dtype"), py::arg("out"), py::arg("stream"));
  m.def(
      "quantize_fp4",
      [](TensorArg w, const std::string& format, TensorArg codes, TensorArg scales, TensorArg global_scale, TensorArg err,
         uintptr_t stream) {
        calibra::QuantizeFp4Params p{w, codes, scales, global_scale, fp4_format(format), err};
        calibra::bind::call_released([&] { return calibra::quantize_fp4_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("w"), py::arg("format"), py::arg("codes"), py::arg("scales"), py::arg("global_scale"), py::arg("err"), py::arg("stream"));
  m.def(
      "dequantize_fp4",
      [](TensorArg codes, TensorArg scales, TensorArg global_scale, const std::string& format, py::object /*dtype*/,
         TensorArg out, uintptr_t stream) {
        calibra::DequantizeFp4Params p{codes, scales, global_scale, out, fp4_format(format)};
        calibra::bind::call_released([&] { return calibra::dequantize_fp4_cuda(p, reinterpret_cast<cudaStream_t>(stream)); });
      },
      py::arg("codes"), py::arg("scales"), py::arg("global_scale"), py::arg("format"), py::arg("dtype"), py::arg("out"), py::arg("stream"));
}
