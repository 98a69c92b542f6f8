// calibra::hessian_accumulate on Metal: H += X^T X for an fp32 H (Metal has no fp64), lower-triangle
// tiles only, mirrored in the same launch so H is exactly symmetric afterwards.
//
// One threadgroup of 256 threads per 32x32 tile (ti, tj), ti >= tj: T (T + 1) / 2 groups for
// T = ceil(d / 32). The group walks the N rows of X in steps of 16; each step stages the two 16x32
// slices of X (the tile's row and column ranges) in threadgroup memory as fp32, barrier, and each
// thread accumulates a 2x2 sub-tile (rows ty + 16a, columns tx + 16b), barrier. Only H's lower
// triangle is read; the owning thread writes both H[i, j] and H[j, i].
#include <metal_stdlib>
using namespace metal;
#include "calibra_common.h"

#define CAL_HT 32
#define CAL_HK 16

kernel void cal_hessian(device float* H [[buffer(0)]],
                        device const uchar* x [[buffer(1)]],
                        constant HessianArgs& a [[buffer(2)]],
                        uint group [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float As[CAL_HK * CAL_HT];
  threadgroup float Bs[CAL_HK * CAL_HT];
  // tile (ti, tj) from group = ti (ti + 1) / 2 + tj
  uint ti = uint((sqrt(8.0f * float(group) + 1.0f) - 1.0f) * 0.5f);
  while (ti * (ti + 1) / 2 > group) --ti;
  while ((ti + 1) * (ti + 2) / 2 <= group) ++ti;
  const uint tj = group - ti * (ti + 1) / 2;
  const ulong i0 = ulong(ti) * CAL_HT, j0 = ulong(tj) * CAL_HT;
  const ulong d = ulong(a.d), n = ulong(a.n);
  const uint tx = tid % 16, ty = tid / 16;
  float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
  for (ulong k0 = 0; k0 < n; k0 += CAL_HK) {
    for (uint e = tid; e < CAL_HK * CAL_HT; e += 256) {
      const uint kk = e / CAL_HT, c = e % CAL_HT;
      const ulong row = k0 + kk;
      float va = 0.0f, vb = 0.0f;
      if (row < n) {
        if (i0 + c < d) va = cal_load(x, row * d + i0 + c, a.dtype);
        if (j0 + c < d) vb = cal_load(x, row * d + j0 + c, a.dtype);
      }
      As[e] = va;
      Bs[e] = vb;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < CAL_HK; ++kk) {
      const float a0 = As[kk * CAL_HT + ty], a1 = As[kk * CAL_HT + ty + 16];
      const float b0 = Bs[kk * CAL_HT + tx], b1 = Bs[kk * CAL_HT + tx + 16];
      acc[0][0] = fma(a0, b0, acc[0][0]);
      acc[0][1] = fma(a0, b1, acc[0][1]);
      acc[1][0] = fma(a1, b0, acc[1][0]);
      acc[1][1] = fma(a1, b1, acc[1][1]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint ia = 0; ia < 2; ++ia) {
    const ulong i = i0 + ty + 16 * ia;
    for (uint jb = 0; jb < 2; ++jb) {
      const ulong j = j0 + tx + 16 * jb;
      if (i < d && j < d && i >= j) {
        const float v = H[i * d + j] + acc[ia][jb];
        H[i * d + j] = v;
        H[j * d + i] = v;
      }
    }
  }
}
