// calibra::hadamard on Metal: one threadgroup per transform block of b <= 4096 elements. The block is
// loaded into threadgroup memory as fp32, the log2(b) butterfly stages run in place with a barrier
// after each, and the result is scaled once and stored. Same butterflies, same order and the same
// fp32 scale as the reference, so the output is bit-identical (there is no multiply-add to fuse).
#include <metal_stdlib>
using namespace metal;
#include "calibra_common.h"

#define CAL_HADAMARD_MAX 4096

kernel void cal_hadamard(device const uchar* x [[buffer(0)]],
                         device uchar* y [[buffer(1)]],
                         constant HadamardArgs& a [[buffer(2)]],
                         uint group [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint nthreads [[threads_per_threadgroup]]) {
  threadgroup float buf[CAL_HADAMARD_MAX];
  const uint b = uint(a.block);
  const ulong base = ulong(group) * ulong(b);
  for (uint j = tid; j < b; j += nthreads) buf[j] = cal_load(x, base + j, a.dtype);
#ifndef CALIBRA_TEST_DROP_BARRIER  // the harness test builds a copy without it, to see the race caught
  threadgroup_barrier(mem_flags::mem_threadgroup);
#endif
  for (uint h = 1; h < b; h <<= 1) {
    for (uint p = tid; p < b / 2; p += nthreads) {
      const uint i = (p / h) * 2u * h + p % h;
      const float lo = buf[i], hi = buf[i + h];
      buf[i] = lo + hi;
      buf[i + h] = lo - hi;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const float scale = as_type<float>(uint(a.scale_bits));
  for (uint j = tid; j < b; j += nthreads) cal_store(y, base + j, a.dtype, buf[j] * scale);
}
