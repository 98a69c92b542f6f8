// N:M sparsity on Metal. cal_nm_mask: one thread per element, ranked against its group by pairwise
// comparison exactly as the reference (stable descending order, -0 == +0). cal_compress_24 /
// cal_decompress_24: one thread per 16-column chunk (one metadata word). Values are moved as raw
// bits, so every output is exact. Data errors (NaN scores, a group with 3+ nonzeros, bad metadata)
// are rejected by the host before dispatch.
#include <metal_stdlib>
using namespace metal;
#include "calibra_common.h"

kernel void cal_nm_mask(device const uchar* scores [[buffer(0)]],
                        device uchar* mask [[buffer(1)]],
                        constant NmMaskArgs& a [[buffer(2)]],
                        uint t [[thread_position_in_grid]]) {
  if (ulong(t) >= ulong(a.rows) * ulong(a.k)) return;
  const ulong j = t % ulong(a.k);
  const ulong g0 = ulong(t) - j % ulong(a.m);
  const uint jj = uint(ulong(t) - g0);
  const float vj = cal_load(scores, t, a.dtype);
  int rank = 0;
  for (uint i = 0; i < uint(a.m); ++i) {
    const float vi = cal_load(scores, g0 + i, a.dtype);
    rank += int(vi > vj) + int(i < jj && vi == vj);
  }
  mask[t] = rank < a.n ? uchar(1) : uchar(0);
}

// Raw element bits (fp32, or fp16/bf16 in the low 16 bits) and their "is nonzero" test: -0 is zero,
// NaN is nonzero.
inline uint cal_bits(device const uchar* p, ulong i, long dt) {
  return dt == kF32 ? ((device const uint*)p)[i] : uint(((device const ushort*)p)[i]);
}
inline void cal_put_bits(device uchar* p, ulong i, long dt, uint v) {
  if (dt == kF32) ((device uint*)p)[i] = v;
  else ((device ushort*)p)[i] = ushort(v);
}
inline bool cal_nonzero(uint bits, long dt) { return (bits & (dt == kF32 ? 0x7fffffffu : 0x7fffu)) != 0u; }

kernel void cal_compress_24(device const uchar* w [[buffer(0)]],
                            device uchar* values [[buffer(1)]],
                            device ushort* meta [[buffer(2)]],
                            constant Sparse24Args& a [[buffer(3)]],
                            uint t [[thread_position_in_grid]]) {
  const ulong kw = ulong(a.k) / 16;
  if (ulong(t) >= ulong(a.rows) * kw) return;
  const ulong r = t / kw, j = t % kw;
  const ulong src = r * ulong(a.k) + 16 * j, dst = r * (ulong(a.k) / 2) + 8 * j;
  uint word = 0;
  for (uint g = 0; g < 4; ++g) {
    uint v[4];
    uint nz = 0;
    for (uint i = 0; i < 4; ++i) {
      v[i] = cal_bits(w, src + 4 * g + i, a.dtype);
      nz |= uint(cal_nonzero(v[i], a.dtype)) << i;
    }
    uint sel = nz;
    if (popcount(sel) > 2u) sel = 0x3u;  // unreachable: the host checked
    while (popcount(sel) < 2u) sel |= ~sel & (sel + 1u);  // add the lowest unused index
    const uint i0 = ctz(sel), i1 = ctz(sel & (sel - 1u));
    cal_put_bits(values, dst + 2 * g, a.dtype, v[i0]);
    cal_put_bits(values, dst + 2 * g + 1, a.dtype, v[i1]);
    word |= (i0 | (i1 << 2)) << (4 * g);
  }
  meta[t] = ushort(word);
}

kernel void cal_decompress_24(device const uchar* values [[buffer(0)]],
                              device const ushort* meta [[buffer(1)]],
                              device uchar* out [[buffer(2)]],
                              constant Sparse24Args& a [[buffer(3)]],
                              uint t [[thread_position_in_grid]]) {
  const ulong kw = ulong(a.k) / 16;
  if (ulong(t) >= ulong(a.rows) * kw) return;
  const ulong r = t / kw, j = t % kw;
  const ulong src = r * (ulong(a.k) / 2) + 8 * j, dst = r * ulong(a.k) + 16 * j;
  const uint word = uint(meta[t]);
  for (uint g = 0; g < 4; ++g) {
    const uint nib = (word >> (4 * g)) & 0xfu;
    const uint i0 = nib & 3u, i1 = nib >> 2;
    for (uint i = 0; i < 4; ++i) {
      const uint v = i == i0 ? cal_bits(values, src + 2 * g, a.dtype)
                   : i == i1 ? cal_bits(values, src + 2 * g + 1, a.dtype) : 0u;
      cal_put_bits(out, dst + 4 * g + i, a.dtype, v);
    }
  }
}
