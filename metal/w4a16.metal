// calibra::w4a16_repack and calibra::w4a16_gemm on Metal: y = x @ dequant(W)^T for int4 weights in the
// W4A16 tile layout of the op (calibra.ops.w4a16_repack; params/gemm.h and calibra.ops._ref.gemm):
// tiled int32 [K/16, 2N]; word [kt, 128 b + 4 lane + j] (b: 64-output block, lane 0..31, j 0..3),
// nibble i = a + 4 c holds code(n = 64 b + 16 j + g + 8 (a >> 1), k = 16 kt + 2 t + c + 8 (a & 1)) with
// g = lane / 4, t = lane % 4. So one word holds 2 outputs (n, n + 8) x 4 inputs (k0, k0 + 1, k0 + 8,
// k0 + 9), all in one scale group (groups are multiples of 16 columns). The 128 words of one (kt, b) are
// consecutive: 512 bytes covering 64 outputs x 16 inputs.
//
// Weights as the op defines them: w = (code - z) * s computed in fp32 and rounded once to x's dtype
// (bit-identical to calibra.ops._ref.gemm.w4a16_dequantize); z = 8 without zeros. Products and sums in
// fp32 (fma), one rounding of y to x's dtype. Scales / zeros are [G, N] in x's dtype.
//
// cal_w4a16_repack: one thread per output word, from calibra.ops.pack(codes, 4) (int32 [N, K/8]).
// cal_w4a16_gemv (M == 1, decode; memory-bound, the point is to stream the weight once): one
//   threadgroup per 64-output block, 256 threads = 2 K slices of 128; thread t of a slice reads word
//   column t of every other kt row (the 128 threads of a slice read 512 consecutive bytes), so it
//   accumulates 2 outputs over 4 inputs per word. The 4 threads holding partial sums of the same
//   outputs (t = lane % 4) meet by simd_shuffle_xor; the two slices meet in threadgroup memory.
// cal_w4a16_gemm (M > 1, prefill): 32 x 64 output tiles (one weight block b), 256 threads with 2 x 4
//   outputs each, K in steps of 32 (two kt rows = 256 words, one per thread, dequantized into
//   threadgroup memory as fp32 next to the x slice).
#include <metal_stdlib>
using namespace metal;
#include "calibra_common.h"

// nibble i of a word: which of its two outputs (0: n, 1: n + 8) and which input offset from 16 kt + 2 t
inline uint cal_w4_row_half(uint i) { return (i & 3u) >> 1; }
inline uint cal_w4_k_off(uint i) { return (i >> 2) + 8u * (i & 1u); }

inline float cal_w4_weight(uint word, uint i, float s, float z, long dt) {
  return cal_round_to((float((word >> (4u * i)) & 0xfu) - z) * s, dt);
}

kernel void cal_w4a16_repack(device const uint* qweight [[buffer(0)]],
                             device uint* tiled [[buffer(1)]],
                             constant W4A16Args& a [[buffer(2)]],
                             uint e [[thread_position_in_grid]]) {
  const ulong N = ulong(a.n), K = ulong(a.k);
  if (ulong(e) >= (K / 16) * 2 * N) return;
  const ulong kt = e / (2 * N), col = e % (2 * N);
  const ulong b = col / 128, lane = (col % 128) / 4, j = col % 4;
  const ulong g = lane / 4, t = lane % 4;
  uint word = 0;
  for (uint i = 0; i < 8; ++i) {
    const ulong n = 64 * b + 16 * j + g + 8 * cal_w4_row_half(i);
    const ulong k = 16 * kt + 2 * t + cal_w4_k_off(i);
    const uint code = (qweight[n * (K / 8) + k / 8] >> (4 * (k % 8))) & 0xfu;
    word |= code << (4u * i);
  }
  tiled[e] = word;
}

#define CAL_GEMV_SLICES 2

kernel void cal_w4a16_gemv(device const uchar* x [[buffer(0)]],
                           device const uint* tiled [[buffer(1)]],
                           device const uchar* scales [[buffer(2)]],
                           device const uchar* zeros [[buffer(3)]],
                           device uchar* y [[buffer(4)]],
                           constant W4A16Args& a [[buffer(5)]],
                           uint b [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float red[CAL_GEMV_SLICES * 64];
  const ulong N = ulong(a.n), K = ulong(a.k);
  const uint slot = tid % 128, slice = tid / 128;
  const uint lane = slot / 4, j = slot % 4, g = lane / 4, t = lane % 4;
  const ulong n_lo = 64 * ulong(b) + 16 * j + g;
  float acc[2] = {0.0f, 0.0f};
  for (ulong kt = slice; kt < K / 16; kt += CAL_GEMV_SLICES) {
    const uint word = tiled[kt * 2 * N + 128 * ulong(b) + slot];
    const ulong gi = (16 * kt) / ulong(a.group);
    float s[2], z[2];
    for (uint h = 0; h < 2; ++h) {
      s[h] = cal_load(scales, gi * N + n_lo + 8 * h, a.dtype);
      z[h] = a.has_zeros ? cal_load(zeros, gi * N + n_lo + 8 * h, a.dtype) : 8.0f;
    }
    const ulong k0 = 16 * kt + 2 * t;
    for (uint i = 0; i < 8; ++i) {
      const uint h = cal_w4_row_half(i);
      acc[h] = fma(cal_w4_weight(word, i, s[h], z[h], a.dtype), cal_load(x, k0 + cal_w4_k_off(i), a.dtype), acc[h]);
    }
  }
  for (uint h = 0; h < 2; ++h) {  // sum over t = bits 2..3 of the lane index
    acc[h] += simd_shuffle_xor(acc[h], ushort(4));
    acc[h] += simd_shuffle_xor(acc[h], ushort(8));
  }
  if (t == 0) {
    red[slice * 64 + 16 * j + g] = acc[0];
    red[slice * 64 + 16 * j + g + 8] = acc[1];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid < 64) {
    float sum = red[tid];
    for (uint sl = 1; sl < CAL_GEMV_SLICES; ++sl) sum += red[sl * 64 + tid];
    cal_store(y, 64 * ulong(b) + tid, a.dtype, sum);
  }
}

#define CAL_GM 32
#define CAL_GN 64
#define CAL_GK 32

kernel void cal_w4a16_gemm(device const uchar* x [[buffer(0)]],
                           device const uint* tiled [[buffer(1)]],
                           device const uchar* scales [[buffer(2)]],
                           device const uchar* zeros [[buffer(3)]],
                           device uchar* y [[buffer(4)]],
                           constant W4A16Args& a [[buffer(5)]],
                           uint2 tile [[threadgroup_position_in_grid]],
                           uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float Xs[CAL_GM * CAL_GK];  // [row of x][kk]
  threadgroup float Ws[CAL_GN * CAL_GK];  // [output of the block][kk]
  const ulong b = tile.x, m0 = ulong(tile.y) * CAL_GM;
  const ulong M = ulong(a.m), N = ulong(a.n), K = ulong(a.k);
  const uint tx = tid % 16, ty = tid / 16;
  // the word this thread dequantizes per K step: kt row (tid / 128) of the step, column slot
  const uint slot = tid % 128, lane = slot / 4, j = slot % 4, g = lane / 4, t = lane % 4;
  const ulong n_lo = 64 * b + 16 * j + g;
  float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
  for (ulong k0 = 0; k0 < K; k0 += CAL_GK) {
    for (uint e = tid; e < CAL_GM * CAL_GK; e += 256) {
      const uint rr = e / CAL_GK, kk = e % CAL_GK;
      Xs[e] = m0 + rr < M ? cal_load(x, (m0 + rr) * K + k0 + kk, a.dtype) : 0.0f;
    }
    const ulong kt = k0 / 16 + tid / 128;
    const uint word = tiled[kt * 2 * N + 128 * b + slot];
    const ulong gi = (16 * kt) / ulong(a.group);
    for (uint i = 0; i < 8; ++i) {
      const uint h = cal_w4_row_half(i);
      const ulong n = n_lo + 8 * h;
      const float s = cal_load(scales, gi * N + n, a.dtype);
      const float z = a.has_zeros ? cal_load(zeros, gi * N + n, a.dtype) : 8.0f;
      const uint kk = 16 * (tid / 128) + 2 * t + cal_w4_k_off(i);
      Ws[(16 * j + g + 8 * h) * CAL_GK + kk] = cal_w4_weight(word, i, s, z, a.dtype);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < CAL_GK; ++kk) {
      float xv[2], wv[4];
      for (uint im = 0; im < 2; ++im) xv[im] = Xs[(ty + 16 * im) * CAL_GK + kk];
      for (uint jn = 0; jn < 4; ++jn) wv[jn] = Ws[(tx + 16 * jn) * CAL_GK + kk];
      for (uint im = 0; im < 2; ++im)
        for (uint jn = 0; jn < 4; ++jn) acc[im][jn] = fma(xv[im], wv[jn], acc[im][jn]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint im = 0; im < 2; ++im) {
    const ulong mr = m0 + ty + 16 * im;
    if (mr >= M) continue;
    for (uint jn = 0; jn < 4; ++jn) cal_store(y, mr * N + 64 * b + tx + 16 * jn, a.dtype, acc[im][jn]);
  }
}
