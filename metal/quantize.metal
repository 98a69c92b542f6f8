// The quantize family on Metal, with the arithmetic of the CPU/CUDA kernels and the reference (IEEE
// division, rint = half to even, scales rounded to w's dtype before use), so codes, zeros and scales
// are bit-identical. NaN/Inf in w is rejected by the host before dispatch (python/calibra/_metal.py).
//
// cal_quantize_int: one threadgroup per (row, group); min/max reduced with simd_min/simd_max, then
//   across SIMD groups through threadgroup memory; thread 0 derives scale and zero.
// cal_fp4_amax_partial / cal_fp4_amax_final: NVFP4's tensor amax in two passes (no atomics), the
//   second turning it into global_scale = 448 * 6 / amax (1 when amax is 0).
// cal_quantize_fp4: one thread per element; the 16 or 32 lanes of a group reduce their amax with
//   simd_shuffle_xor (groups never straddle SIMD groups: the grid is a multiple of 32 threads and
//   groups start at multiples of their size).
// cal_dequantize_int / cal_dequantize_fp4: one thread per element.
#include <metal_stdlib>
using namespace metal;
#include "calibra_common.h"

#define CAL_QUANT_THREADS 128

kernel void cal_quantize_int(device const uchar* w [[buffer(0)]],
                             device uchar* codes [[buffer(1)]],
                             device uchar* scales [[buffer(2)]],
                             device uchar* zeros [[buffer(3)]],
                             constant QuantizeIntArgs& a [[buffer(4)]],
                             uint group [[threadgroup_position_in_grid]],
                             uint tid [[thread_index_in_threadgroup]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint simd [[simdgroup_index_in_threadgroup]]) {
  threadgroup float red[2 * CAL_QUANT_THREADS / 32];
  threadgroup float params[2];
  const ulong r = group / ulong(a.groups), g = group % ulong(a.groups);
  const ulong c0 = g * ulong(a.group);
  const ulong row0 = r * ulong(a.cols) + c0;
  float mn = 0.0f, mx = 0.0f;  // the reference clamps min <= 0 <= max
  for (ulong j = tid; j < ulong(a.group); j += CAL_QUANT_THREADS) {
    const float v = cal_load(w, row0 + j, a.dtype);
    mn = fmin(mn, v);
    mx = fmax(mx, v);
  }
  mn = simd_min(mn);
  mx = simd_max(mx);
  if (lane == 0) {
    red[simd] = mn;
    red[CAL_QUANT_THREADS / 32 + simd] = mx;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    for (uint k = 1; k < CAL_QUANT_THREADS / 32; ++k) {
      mn = fmin(mn, red[k]);
      mx = fmax(mx, red[CAL_QUANT_THREADS / 32 + k]);
    }
    const float maxq = float((1 << a.bits) - 1);
    float s, z;
    if (a.symmetric) {
      const float amax = fmax(-mn, mx);
      s = cal_round_to(cal_div(2.0f * amax, maxq), a.dtype);
      if (s == 0.0f) s = 1.0f;
      z = cal_div(maxq + 1.0f, 2.0f);
    } else {
      s = cal_round_to(cal_div(mx - mn, maxq), a.dtype);
      if (s == 0.0f) s = 1.0f;
      z = clamp(rint(cal_div(-mn, s)), 0.0f, maxq);
    }
    cal_store(scales, r * ulong(a.groups) + g, a.dtype, s);
    zeros[r * ulong(a.groups) + g] = uchar(z);
    params[0] = s;
    params[1] = z;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float s = params[0], z = params[1];
  const float maxq = float((1 << a.bits) - 1);
  for (ulong j = tid; j < ulong(a.group); j += CAL_QUANT_THREADS) {
    float q = cal_div(cal_load(w, row0 + j, a.dtype), s);
    q = clamp(q, -4194304.0f, 4194304.0f);
    q = clamp(rint(q) + z, 0.0f, maxq);
    codes[row0 + j] = uchar(q);
  }
}

kernel void cal_dequantize_int(device const uchar* codes [[buffer(0)]],
                               device const uchar* scales [[buffer(1)]],
                               device const uchar* zeros [[buffer(2)]],
                               device uchar* out [[buffer(3)]],
                               constant DequantizeIntArgs& a [[buffer(4)]],
                               uint e [[thread_position_in_grid]]) {
  if (ulong(e) >= ulong(a.rows) * ulong(a.cols)) return;
  const ulong r = e / ulong(a.cols), c = e % ulong(a.cols), g = c / ulong(a.group);
  const ulong sg = r * ulong(a.groups) + g;
  const float q = float(codes[e]);
  const float z = float(zeros[sg]);
  const float s = cal_load(scales, sg, a.scale_dtype);
  cal_store(out, e, a.out_dtype, (q - z) * s);
}

#define CAL_AMAX_THREADS 256

kernel void cal_fp4_amax_partial(device const uchar* w [[buffer(0)]],
                                 device float* partial [[buffer(1)]],
                                 constant Fp4Args& a [[buffer(2)]],
                                 uint group [[threadgroup_position_in_grid]],
                                 uint tid [[thread_index_in_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint simd [[simdgroup_index_in_threadgroup]]) {
  threadgroup float red[CAL_AMAX_THREADS / 32];
  const ulong total = ulong(a.rows) * ulong(a.cols);
  const ulong stride = ulong(a.partials) * CAL_AMAX_THREADS;
  float m = 0.0f;
  for (ulong e = ulong(group) * CAL_AMAX_THREADS + tid; e < total; e += stride) m = fmax(m, fabs(cal_load(w, e, a.dtype)));
  m = simd_max(m);
  if (lane == 0) red[simd] = m;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    for (uint k = 1; k < CAL_AMAX_THREADS / 32; ++k) m = fmax(m, red[k]);
    partial[group] = m;
  }
}

kernel void cal_fp4_amax_final(device const float* partial [[buffer(0)]],
                               device float* global_scale [[buffer(1)]],
                               constant Fp4Args& a [[buffer(2)]],
                               uint tid [[thread_index_in_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]],
                               uint simd [[simdgroup_index_in_threadgroup]]) {
  threadgroup float red[CAL_AMAX_THREADS / 32];
  float m = 0.0f;
  for (long i = tid; i < a.partials; i += CAL_AMAX_THREADS) m = fmax(m, partial[i]);
  m = simd_max(m);
  if (lane == 0) red[simd] = m;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    for (uint k = 1; k < CAL_AMAX_THREADS / 32; ++k) m = fmax(m, red[k]);
    global_scale[0] = m == 0.0f ? 1.0f : cal_div(2688.0f, m);
  }
}

kernel void cal_quantize_fp4(device const uchar* w [[buffer(0)]],
                             device uchar* codes [[buffer(1)]],
                             device uchar* scales [[buffer(2)]],
                             device const float* global_scale [[buffer(3)]],
                             constant Fp4Args& a [[buffer(4)]],
                             uint e [[thread_position_in_grid]]) {
  const ulong total = ulong(a.rows) * ulong(a.cols);
  const bool in = ulong(e) < total;
  const float v = in ? cal_load(w, e, a.dtype) : 0.0f;
  float amax = fabs(v);
  // Every lane takes part in every shuffle (uniform control flow), in range or not.
  for (ushort o = ushort(a.group / 2); o > 0; o >>= 1) amax = fmax(amax, simd_shuffle_xor(amax, o));
  if (!in) return;
  const ulong grp = e / ulong(a.group);
  float d;
  uchar sb;
  if (a.mx) {
    if (amax == 0.0f) {
      sb = 0;
      d = 0.0f;
    } else {
      const int ex = cal_mx_exponent(amax);
      sb = uchar(ex + 127);
      d = cal_exp2_int(ex);
    }
  } else {
    const float gs = global_scale[0];
    sb = cal_e4m3_from_float(cal_div(amax, 6.0f) * gs);
    d = cal_div(cal_e4m3_to_float(sb), gs);
  }
  if (e % ulong(a.group) == 0) scales[grp] = sb;
  codes[e] = d == 0.0f ? uchar(0) : cal_e2m1_encode(cal_div(v, d));
}

kernel void cal_dequantize_fp4(device const uchar* codes [[buffer(0)]],
                               device const uchar* scales [[buffer(1)]],
                               device const float* global_scale [[buffer(2)]],
                               device uchar* out [[buffer(3)]],
                               constant Fp4Args& a [[buffer(4)]],
                               uint e [[thread_position_in_grid]]) {
  if (ulong(e) >= ulong(a.rows) * ulong(a.cols)) return;
  const uchar sb = scales[e / ulong(a.group)];
  float d;
  if (a.mx) d = sb == 255 ? as_type<float>(0x7fc00000u) : cal_exp2_int(int(sb) - 127);
  else d = cal_div(cal_e4m3_to_float(sb), global_scale[0]);
  cal_store(out, e, a.dtype, cal_e2m1_decode(codes[e]) * d);
}
