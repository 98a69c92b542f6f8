// calibra::quantize_int / dequantize_int / quantize_fp4 / dequantize_fp4 -- round-to-nearest weight
// quantization of a 2-D weight [out, in] into integer codes (GPTQ convention) or FP4 (MXFP4, NVFP4).
#pragma once
#include <cstdint>

#include "calibra/status.h"
#include "calibra/stream.h"
#include "calibra/tensor_arg.h"

namespace calibra {

struct QuantizeIntParams {
  // w:      [out, in] float32 | float16 | bfloat16, any strides.
  // codes:  [out, in] uint8, contiguous: q = clamp(rne(w / scale) + zero, 0, 2^bits - 1).
  // scales: [out, G] w's dtype, contiguous. G = in / group_size (1 when group_size == -1).
  // zeros:  [out, G] uint8, contiguous.
  // Symmetric: scale = 2 * amax / maxq, zero = (maxq + 1) / 2. Asymmetric: xmin = min(min w, 0),
  // xmax = max(max w, 0), scale = (xmax - xmin) / maxq, zero = clamp(rne(-xmin / scale), 0, maxq).
  // The scale is rounded to w's dtype first (a stored scale of 0 becomes 1) and zero and codes are
  // computed from the stored scale in fp32 with true divisions (see calibra.ops._ref.quantize).
  // Non-finite w: the CPU kernel returns kNonFinite naming the first bad element in row-major order;
  // the CUDA kernel atomicMin's that element's index into err (see below).
  TensorArg w;
  TensorArg codes;
  TensorArg scales;
  TensorArg zeros;
  int64_t bits = 4;
  int64_t group_size = -1;
  bool symmetric = true;
  TensorArg err;  // CUDA only: int64 [1] data-error flag preset to INT64_MAX (registry @cuda_data_error)
};

struct DequantizeIntParams {
  // codes [out, in] uint8, scales [out, G] float, zeros [out, G] uint8 (any strides);
  // out [out, in] float32 | float16 | bfloat16, contiguous: out = (q - zero) * scale in fp32.
  TensorArg codes;
  TensorArg scales;
  TensorArg zeros;
  TensorArg out;
  int64_t group_size = -1;
};

enum class Fp4Format : int { kMxfp4 = 0, kNvfp4 = 1 };

struct QuantizeFp4Params {
  // w [out, in] float, any strides; codes [out, in] uint8 E2M1 (sign << 3 | idx), contiguous.
  // mxfp4: scales [out, in/32] uint8 E8M0; global_scale float32 [1] = 1.
  // nvfp4: scales [out, in/16] float8_e4m3fn; global_scale float32 [1] = 448 * 6 / amax(w).
  TensorArg w;
  TensorArg codes;
  TensorArg scales;
  TensorArg global_scale;
  Fp4Format format = Fp4Format::kMxfp4;
  TensorArg err;  // CUDA only: int64 [1] data-error flag, as in QuantizeIntParams
};

struct DequantizeFp4Params {
  TensorArg codes;
  TensorArg scales;
  TensorArg global_scale;
  TensorArg out;  // [out, in] float32 | float16 | bfloat16, contiguous
  Fp4Format format = Fp4Format::kMxfp4;
};

// "mxfp4" / "nvfp4" -> format; false for anything else.
inline bool parse_fp4_format(const char* s, Fp4Format* f) {
  const char* mx = "mxfp4";
  const char* nv = "nvfp4";
  auto eq = [](const char* a, const char* b) {
    while (*a && *a == *b) { ++a; ++b; }
    return *a == *b;
  };
  if (eq(s, mx)) { *f = Fp4Format::kMxfp4; return true; }
  if (eq(s, nv)) { *f = Fp4Format::kNvfp4; return true; }
  return false;
}

Status quantize_int_cpu(const QuantizeIntParams& p);
Status dequantize_int_cpu(const DequantizeIntParams& p);
Status quantize_fp4_cpu(const QuantizeFp4Params& p);
Status dequantize_fp4_cpu(const DequantizeFp4Params& p);
// Test hook: out[i] = float8_e4m3fn bits of x[i] (x float32 contiguous, out uint8 contiguous).
Status float_to_e4m3_cpu(const TensorArg& x, const TensorArg& out);

Status quantize_int_cuda(const QuantizeIntParams& p, cudaStream_t stream);
Status dequantize_int_cuda(const DequantizeIntParams& p, cudaStream_t stream);
Status quantize_fp4_cuda(const QuantizeFp4Params& p, cudaStream_t stream);
Status dequantize_fp4_cuda(const DequantizeFp4Params& p, cudaStream_t stream);

}  // namespace calibra
