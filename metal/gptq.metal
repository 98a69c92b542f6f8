// calibra::gptq_block_sweep and calibra::sparsegpt_block_sweep on Metal: GPTQ's sequential column sweep
// over one block (csrc/include/calibra/params/gptq.h has the algorithm). Rows are independent (H couples
// only columns), so one thread owns one output row and walks the block's columns in order, like the CUDA
// kernel. Same operations in the same order per element as calibra.ops._ref.gptq and the CPU/CUDA
// kernels -- IEEE division, rint (half to even), multiply then subtract -- so codes, masks, values,
// errors and fitted tables are meant to be bit-identical (the metallib is built with -fno-fast-math).
//
// Memory: the row's working values (the error-updated weights) live in a scratch buffer xt [C, R]
// (column-major: thread r reads xt[j * R + r], so the 32 lanes of a SIMD group touch 32 consecutive
// floats); every U[i, j] read is the same address across the SIMD group, a broadcast. The parameter table
// of the row lives in its rows of scales_out / zeros_out.
//
// sparsegpt_block_sweep (a.nm_m > 0): at each group's first column the thread ranks the group's m
// saliencies x_j^2 / (u_jj * u_jj) (rank(j) = #{k: s_k > s_j} + #{k < j: s_k == s_j}; prune rank >= n)
// into a 32-bit mask held in a register, and writes the chosen mask to `prune`.
//
// Group / fit entries out of range are rejected on the host before dispatch (calibra/ops/_mps.py);
// a kernel cannot raise.
#include <metal_stdlib>
using namespace metal;
#include "calibra_common.h"

#define CAL_SWEEP_THREADS 64
#define CAL_SWEEP_MAX_M 32

enum CalSweepFormat { kSweepInt = 0, kSweepMxfp4 = 1, kSweepNvfp4 = 2, kSweepNone = 3 };

// The value of x quantized with (s, z); writes the code.
inline float cal_sweep_quant(constant GptqSweepArgs& a, float x, float s, float z, thread uchar& code) {
  if (a.format == kSweepNone) {
    code = 0;
    return x;
  }
  if (a.format == kSweepInt) {
    const float maxq = float((1 << a.bits) - 1);
    float q = clamp(cal_div(x, s), -4194304.0f, 4194304.0f);
    q = clamp(rint(q) + z, 0.0f, maxq);
    code = uchar(q);
    return (q - z) * s;
  }
  const float d = cal_div(s, as_type<float>(uint(a.global_scale_bits)));
  if (d == 0.0f) {
    code = 0;
    return 0.0f;
  }
  code = cal_e2m1_encode(cal_div(x, d));
  return cal_e2m1_decode(code) * d;
}

// Fit (s, z) of this row from the n current values xt[0], xt[stride], ...: min/max (clamped around 0),
// then each clipping candidate of `shrink`; the first strictly lower squared error wins.
inline void cal_sweep_fit(constant GptqSweepArgs& a, device const float* xt, ulong stride, long n,
                          device const float* shrink, thread float& s_out, thread float& z_out) {
  if (a.format == kSweepNone) {
    s_out = 1.0f;
    z_out = 0.0f;
    return;
  }
  float mn = 0.0f, mx = 0.0f;
  for (long c = 0; c < n; ++c) {
    const float v = xt[ulong(c) * stride];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  const float gs = as_type<float>(uint(a.global_scale_bits));
  float best_e = 0.0f;
  for (long k = 0; k < a.nshrink; ++k) {
    const float p = shrink[k];
    float s, z;
    if (a.format == kSweepInt) {
      const float maxq = float((1 << a.bits) - 1);
      const float mnp = mn * p, mxp = mx * p;
      const float raw = a.symmetric ? cal_div(2.0f * (-mnp > mxp ? -mnp : mxp), maxq) : cal_div(mxp - mnp, maxq);
      s = cal_round_to(raw, a.scale_dtype);
      if (s == 0.0f) s = 1.0f;
      z = a.symmetric ? cal_div(maxq + 1.0f, 2.0f) : clamp(rint(cal_div(-mnp, s)), 0.0f, maxq);
    } else {
      const float am = (-mn > mx ? -mn : mx) * p;
      if (a.format == kSweepNvfp4) s = cal_e4m3_to_float(cal_e4m3_from_float(cal_div(am, 6.0f) * gs));
      else s = am == 0.0f ? 0.0f : cal_exp2_int(cal_mx_exponent(am));
      z = 0.0f;
    }
    if (a.nshrink == 1) {
      s_out = s;
      z_out = z;
      return;
    }
    float e = 0.0f;
    uchar code;
    for (long c = 0; c < n; ++c) {
      const float x = xt[ulong(c) * stride];
      const float diff = cal_sweep_quant(a, x, s, z, code) - x;
      e = e + diff * diff;
    }
    if (k == 0 || e < best_e) {
      best_e = e;
      s_out = s;
      z_out = z;
    }
  }
}

// The prune mask (bit c = column i + c) of the N:M group of m columns starting at column i.
inline uint cal_sweep_select_nm(constant GptqSweepArgs& a, device const float* xt, ulong stride,
                                device const float* u, long i) {
  const long m = a.nm_m, C = a.cols;
  float sal[CAL_SWEEP_MAX_M];
  for (long c = 0; c < m; ++c) {
    const float x = xt[ulong(c) * stride];
    const float d = u[ulong(i + c) * ulong(C) + ulong(i + c)];
    sal[c] = cal_div(x * x, d * d);
  }
  uint bits = 0;
  for (long c = 0; c < m; ++c) {
    long rank = 0;
    for (long k = 0; k < c; ++k) rank += sal[k] >= sal[c] ? 1 : 0;
    for (long k = c + 1; k < m; ++k) rank += sal[k] > sal[c] ? 1 : 0;
    bits |= uint(rank >= a.nm_n ? 1 : 0) << uint(c);
  }
  return bits;
}

kernel void cal_gptq_sweep(device const float* w [[buffer(0)]],
                           device const float* u [[buffer(1)]],
                           device const float* scales [[buffer(2)]],
                           device const float* zeros [[buffer(3)]],
                           device const int* group [[buffer(4)]],
                           device const int* fit [[buffer(5)]],
                           device const uchar* mask [[buffer(6)]],
                           device const float* shrink [[buffer(7)]],
                           device float* xt [[buffer(8)]],
                           device float* q [[buffer(9)]],
                           device uchar* codes [[buffer(10)]],
                           device float* err [[buffer(11)]],
                           device float* scales_out [[buffer(12)]],
                           device float* zeros_out [[buffer(13)]],
                           device uchar* prune [[buffer(14)]],
                           constant GptqSweepArgs& a [[buffer(15)]],
                           uint row [[thread_position_in_grid]]) {
  const ulong R = ulong(a.rows), C = ulong(a.cols), G = ulong(a.groups);
  if (ulong(row) >= R) return;
  const ulong r = row;
  for (ulong c = 0; c < C; ++c) xt[c * R + r] = w[r * C + c];
  device float* S = scales_out + r * G;
  device float* Z = zeros_out + r * G;
  for (ulong g = 0; g < G; ++g) {
    S[g] = scales[r * G + g];
    Z[g] = zeros[r * G + g];
  }
  uint group_prune = 0;
  long gpos = 0;  // i % nm_m
  for (ulong i = 0; i < C; ++i) {
    const ulong g = ulong(group[i]);
    const long f = fit[i];
    bool pruned = false;
    if (a.nm_m > 0) {
      if (gpos == 0) group_prune = cal_sweep_select_nm(a, xt + i * R + r, R, u, long(i));
      pruned = ((group_prune >> uint(gpos)) & 1u) != 0u;
      prune[r * C + i] = pruned ? 1 : 0;
      gpos = gpos + 1 == a.nm_m ? 0 : gpos + 1;
    } else if (a.has_mask) {
      pruned = mask[r * C + i] != 0;
    }
    if (f > 0) {
      float s, z;
      cal_sweep_fit(a, xt + i * R + r, R, f, shrink, s, z);
      S[g] = s;
      Z[g] = z;
    }
    const float xi = xt[i * R + r];
    uchar code;
    float v = cal_sweep_quant(a, xi, S[g], Z[g], code);
    if (pruned) {
      v = 0.0f;
      code = a.format == kSweepInt ? uchar(Z[g]) : uchar(0);
    }
    const float e = cal_div(xi - v, u[i * C + i]);
    q[r * C + i] = v;
    codes[r * C + i] = code;
    err[r * C + i] = e;
    device const float* ui = u + i * C;
    for (ulong j = i + 1; j < C; ++j) xt[j * R + r] = xt[j * R + r] - e * ui[j];
  }
}
