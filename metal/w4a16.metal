// W4A16 inference on Metal: y = x @ dequant(W)^T for int4 weights W [n, k] quantized per group of
// `group` columns (calibra.ops.quantize(..., bits=4)), stored as calibra.ops.pack(codes, 4): int32
// words [n, k / 8], code c of a row at bits 4 (c % 8) of word c / 8. Scales [n, k / group] and x, y
// in one float dtype; zeros uint8 [n, k / group] (asymmetric) or the fixed 8 (symmetric).
// Dequantized weight: (q - z) * s, accumulated in fp32.
//
// cal_w4a16_gemv (m == 1, decode): memory-bound, so the point is to stream the packed weight once
//   at full bandwidth: one SIMD group per output row, 4 rows per threadgroup; lane l reads words
//   l, l + 32, ... of the row (consecutive lanes, consecutive words) and the 8 matching x values,
//   multiplies by the group scale once per word, and the 32 partial sums meet in simd_sum.
// cal_w4a16_gemm (m > 1, prefill): a plain tiled GEMM: 32x32 output tiles, 256 threads with 2x2
//   outputs each, K in steps of 32: the x slice and the dequantized W slice are staged in
//   threadgroup memory as fp32.
#include <metal_stdlib>
using namespace metal;
#include "calibra_common.h"

#define CAL_GEMV_ROWS 4

inline float cal_w4_zero(device const uchar* zeros, ulong i, long has_zeros) {
  return has_zeros ? float(zeros[i]) : 8.0f;
}

kernel void cal_w4a16_gemv(device const uchar* x [[buffer(0)]],
                           device const uint* qweight [[buffer(1)]],
                           device const uchar* scales [[buffer(2)]],
                           device const uchar* zeros [[buffer(3)]],
                           device uchar* y [[buffer(4)]],
                           constant W4A16Args& a [[buffer(5)]],
                           uint group [[threadgroup_position_in_grid]],
                           uint lane [[thread_index_in_simdgroup]],
                           uint simd [[simdgroup_index_in_threadgroup]]) {
  const ulong row = ulong(group) * CAL_GEMV_ROWS + simd;
  const bool live = row < ulong(a.n);
  const ulong r = live ? row : 0;  // dead SIMD groups still reach simd_sum (uniform control flow)
  const ulong words = ulong(a.k) / 8;
  const ulong wpg = ulong(a.group) / 8;  // words per scale group
  float acc = 0.0f;
  for (ulong wi = lane; wi < words; wi += 32) {
    const uint word = qweight[r * words + wi];
    const ulong g = wi / wpg;
    const float s = cal_load(scales, r * ulong(a.groups) + g, a.dtype);
    const float z = cal_w4_zero(zeros, r * ulong(a.groups) + g, a.has_zeros);
    float part = 0.0f;
    for (uint c = 0; c < 8; ++c) {
      const float q = float((word >> (4 * c)) & 0xfu);
      part = fma(q - z, cal_load(x, wi * 8 + c, a.dtype), part);
    }
    acc = fma(part, s, acc);
  }
  acc = simd_sum(acc);
  if (live && lane == 0) cal_store(y, row, a.dtype, acc);
}

#define CAL_GT 32
#define CAL_GK 32

kernel void cal_w4a16_gemm(device const uchar* x [[buffer(0)]],
                           device const uint* qweight [[buffer(1)]],
                           device const uchar* scales [[buffer(2)]],
                           device const uchar* zeros [[buffer(3)]],
                           device uchar* y [[buffer(4)]],
                           constant W4A16Args& a [[buffer(5)]],
                           uint2 tile [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float Xs[CAL_GT * CAL_GK];  // [row of x][kk]
  threadgroup float Ws[CAL_GT * CAL_GK];  // [row of W][kk]
  const ulong m0 = ulong(tile.y) * CAL_GT, n0 = ulong(tile.x) * CAL_GT;
  const ulong M = ulong(a.m), N = ulong(a.n), K = ulong(a.k), words = K / 8;
  const uint tx = tid % 16, ty = tid / 16;
  float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
  for (ulong k0 = 0; k0 < K; k0 += CAL_GK) {
    for (uint e = tid; e < CAL_GT * CAL_GK; e += 256) {
      const uint rr = e / CAL_GK, kk = e % CAL_GK;
      const ulong col = k0 + kk;
      float xv = 0.0f, wv = 0.0f;
      if (col < K) {
        if (m0 + rr < M) xv = cal_load(x, (m0 + rr) * K + col, a.dtype);
        if (n0 + rr < N) {
          const ulong wr = n0 + rr, g = col / ulong(a.group);
          const uint q = (qweight[wr * words + col / 8] >> (4 * (col % 8))) & 0xfu;
          const float s = cal_load(scales, wr * ulong(a.groups) + g, a.dtype);
          wv = (float(q) - cal_w4_zero(zeros, wr * ulong(a.groups) + g, a.has_zeros)) * s;
        }
      }
      Xs[e] = xv;
      Ws[e] = wv;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < CAL_GK; ++kk) {
      const float x0 = Xs[ty * CAL_GK + kk], x1 = Xs[(ty + 16) * CAL_GK + kk];
      const float w0 = Ws[tx * CAL_GK + kk], w1 = Ws[(tx + 16) * CAL_GK + kk];
      acc[0][0] = fma(x0, w0, acc[0][0]);
      acc[0][1] = fma(x0, w1, acc[0][1]);
      acc[1][0] = fma(x1, w0, acc[1][0]);
      acc[1][1] = fma(x1, w1, acc[1][1]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint i = 0; i < 2; ++i) {
    const ulong mr = m0 + ty + 16 * i;
    for (uint j = 0; j < 2; ++j) {
      const ulong nc = n0 + tx + 16 * j;
      if (mr < M && nc < N) cal_store(y, mr * N + nc, a.dtype, acc[i][j]);
    }
  }
}
