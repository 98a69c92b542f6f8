// A second copy of cal_hadamard with its first threadgroup barrier compiled out
// (CALIBRA_TEST_DROP_BARRIER), registered as "cal_hadamard_nobarrier": tests/metal shows that the
// harness catches the missing barrier (wrong output under a skewed thread start).
#include "kernels_table.h"

#define CALIBRA_TEST_DROP_BARRIER 1
#define cal_hadamard cal_hadamard_nobarrier
#include "../hadamard.metal"
#undef cal_hadamard

#undef kernel
#undef device
#undef constant
#undef thread
#undef threadgroup

namespace mh {
namespace {
Register r_nobarrier("cal_hadamard_nobarrier", [](void** b, const Pos& p) {
  cal_hadamard_nobarrier(static_cast<const unsigned char*>(b[0]), static_cast<unsigned char*>(b[1]),
                         *static_cast<HadamardArgs*>(b[2]), p.group_pos.x, p.tid, p.group_size.count());
});
}  // namespace
}  // namespace mh
