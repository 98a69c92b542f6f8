// Argument structs of calibra's Metal kernels, shared by the shaders, the CPU harness and the Python
// host code (python/calibra/_metal.py builds each one as an int64 tensor, field by field in this
// order; tests/metal checks that the orders agree). Only `long` fields: a struct of n longs has the
// same bytes as an int64[n] buffer on every side, with no padding rules to get wrong.
// Float arguments travel as their fp32 bit pattern in a long (`*_bits`).
#pragma once

// dtype codes: calibra::DType (csrc/include/calibra/dtype.h)
enum CalibraDType { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct HadamardArgs {
  long blocks;      // number of transform blocks (rows * n / block)
  long block;       // block size b, a power of two <= 4096
  long dtype;       // x and y
  long scale_bits;  // fp32 bits of 1/sqrt(b), rounded from double like the reference
};

struct QuantizeIntArgs {
  long rows, cols;
  long group;   // columns per group
  long groups;  // groups per row
  long bits;
  long symmetric;
  long dtype;   // w and scales
};

struct DequantizeIntArgs {
  long rows, cols, group, groups;
  long scale_dtype;
  long out_dtype;
};

struct Fp4Args {
  long rows, cols;
  long group;       // 32 (mxfp4) or 16 (nvfp4)
  long mx;          // 1 for mxfp4
  long dtype;       // w (quantize) or out (dequantize)
  long partials;    // amax partial count (nvfp4 amax pass)
};

struct PackArgs {
  long rows, cols;  // of the codes
  long bits;
  long dim;         // 0 or 1: the dim packed along
  long word_bits;   // 32 or 8
  long words;       // words per line
};

struct NmMaskArgs {
  long rows, k, n, m, dtype;
};

struct Sparse24Args {
  long rows, k;  // of the dense matrix
  long dtype;
};

struct HessianArgs {
  long n, d;     // X is [n, d], contiguous
  long tiles;    // T = ceil(d / 32); T (T + 1) / 2 threadgroups
  long dtype;    // of X; H is fp32
};

struct W4A16Args {
  long m, n, k;     // x [m, k], W [n, k] in the op's tile layout int32 [k / 16, 2 n], y [m, n]
  long group;       // columns per scale group (a multiple of 16; k for per-channel)
  long groups;      // k / group
  long has_zeros;   // 0: symmetric, zero point 8
  long dtype;       // x, scales, zeros and y
};

struct GptqSweepArgs {
  long rows, cols;   // w [R, C]
  long groups;       // G: columns of the parameter table
  long nshrink;      // clipping candidates
  long nm_n, nm_m;   // sparsegpt_block_sweep: keep n of every m; nm_m == 0 for gptq_block_sweep
  long has_mask;     // gptq_block_sweep: 1 when mask [R, C] is given
  long bits;         // format int: 2..8
  long symmetric;
  long format;       // 0 int, 1 mxfp4, 2 nvfp4, 3 none (calibra::SweepFormat)
  long scale_dtype;  // int scales are rounded to this dtype when fitted
  long global_scale_bits;  // fp32 bits of NVFP4's global scale (1 otherwise)
};
