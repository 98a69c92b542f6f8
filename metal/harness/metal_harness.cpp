// The CPU harness for calibra's Metal kernels: every metal/*.metal file compiled as C++ against
// metal_compat.h, exposed to Python (tests/metal) through one C entry point, mh_launch().
// Built only with -DCALIBRA_METAL_HARNESS=ON or by tests/metal (never part of the wheel).
#include <cstdio>
#include <exception>

#include "kernels_table.h"

// ---- the kernels, as shipped ----
#include "../hadamard.metal"
#include "../quantize.metal"
#include "../pack.metal"
#include "../sparsity.metal"
#include "../hessian.metal"
#include "../w4a16.metal"
#include "../gptq.metal"

#undef kernel
#undef device
#undef constant
#undef thread
#undef threadgroup

namespace mh {

std::map<std::string, Entry>& table() {
  static std::map<std::string, Entry> t;
  return t;
}

namespace {
using u8 = unsigned char;
template <class T> T* B(void** b, int i) { return static_cast<T*>(b[i]); }
template <class T> T& A(void** b, int i) { return *static_cast<T*>(b[i]); }

Register r_hadamard("cal_hadamard", [](void** b, const Pos& p) {
  cal_hadamard(B<const u8>(b, 0), B<u8>(b, 1), A<HadamardArgs>(b, 2), p.group_pos.x, p.tid, p.group_size.count());
});
Register r_qint("cal_quantize_int", [](void** b, const Pos& p) {
  cal_quantize_int(B<const u8>(b, 0), B<u8>(b, 1), B<u8>(b, 2), B<u8>(b, 3), A<QuantizeIntArgs>(b, 4), p.group_pos.x,
                   p.tid, p.lane, p.simd);
});
Register r_dqint("cal_dequantize_int", [](void** b, const Pos& p) {
  cal_dequantize_int(B<const u8>(b, 0), B<const u8>(b, 1), B<const u8>(b, 2), B<u8>(b, 3), A<DequantizeIntArgs>(b, 4),
                     p.grid_pos.x);
});
Register r_amax_p("cal_fp4_amax_partial", [](void** b, const Pos& p) {
  cal_fp4_amax_partial(B<const u8>(b, 0), B<float>(b, 1), A<Fp4Args>(b, 2), p.group_pos.x, p.tid, p.lane, p.simd);
});
Register r_amax_f("cal_fp4_amax_final", [](void** b, const Pos& p) {
  cal_fp4_amax_final(B<const float>(b, 0), B<float>(b, 1), A<Fp4Args>(b, 2), p.tid, p.lane, p.simd);
});
Register r_qfp4("cal_quantize_fp4", [](void** b, const Pos& p) {
  cal_quantize_fp4(B<const u8>(b, 0), B<u8>(b, 1), B<u8>(b, 2), B<const float>(b, 3), A<Fp4Args>(b, 4), p.grid_pos.x);
});
Register r_dqfp4("cal_dequantize_fp4", [](void** b, const Pos& p) {
  cal_dequantize_fp4(B<const u8>(b, 0), B<const u8>(b, 1), B<const float>(b, 2), B<u8>(b, 3), A<Fp4Args>(b, 4),
                     p.grid_pos.x);
});
Register r_pack("cal_pack", [](void** b, const Pos& p) {
  cal_pack(B<const u8>(b, 0), B<u8>(b, 1), A<PackArgs>(b, 2), p.grid_pos.x);
});
Register r_unpack("cal_unpack", [](void** b, const Pos& p) {
  cal_unpack(B<const u8>(b, 0), B<u8>(b, 1), A<PackArgs>(b, 2), p.grid_pos.x);
});
Register r_nm("cal_nm_mask", [](void** b, const Pos& p) {
  cal_nm_mask(B<const u8>(b, 0), B<u8>(b, 1), A<NmMaskArgs>(b, 2), p.grid_pos.x);
});
Register r_c24("cal_compress_24", [](void** b, const Pos& p) {
  cal_compress_24(B<const u8>(b, 0), B<u8>(b, 1), B<unsigned short>(b, 2), A<Sparse24Args>(b, 3), p.grid_pos.x);
});
Register r_d24("cal_decompress_24", [](void** b, const Pos& p) {
  cal_decompress_24(B<const u8>(b, 0), B<const unsigned short>(b, 1), B<u8>(b, 2), A<Sparse24Args>(b, 3), p.grid_pos.x);
});
Register r_hess("cal_hessian", [](void** b, const Pos& p) {
  cal_hessian(B<float>(b, 0), B<const u8>(b, 1), A<HessianArgs>(b, 2), p.group_pos.x, p.tid);
});
Register r_repack("cal_w4a16_repack", [](void** b, const Pos& p) {
  cal_w4a16_repack(B<const unsigned>(b, 0), B<unsigned>(b, 1), A<W4A16Args>(b, 2), p.grid_pos.x);
});
Register r_gemv("cal_w4a16_gemv", [](void** b, const Pos& p) {
  cal_w4a16_gemv(B<const u8>(b, 0), B<const unsigned>(b, 1), B<const u8>(b, 2), B<const u8>(b, 3), B<u8>(b, 4),
                 A<W4A16Args>(b, 5), p.group_pos.x, p.tid);
});
Register r_gemm("cal_w4a16_gemm", [](void** b, const Pos& p) {
  cal_w4a16_gemm(B<const u8>(b, 0), B<const unsigned>(b, 1), B<const u8>(b, 2), B<const u8>(b, 3), B<u8>(b, 4),
                 A<W4A16Args>(b, 5), metal::uint2(p.group_pos.x, p.group_pos.y), p.tid);
});
Register r_sweep("cal_gptq_sweep", [](void** b, const Pos& p) {
  cal_gptq_sweep(B<const float>(b, 0), B<const float>(b, 1), B<const float>(b, 2), B<const float>(b, 3),
                 B<const int>(b, 4), B<const int>(b, 5), B<const u8>(b, 6), B<const float>(b, 7), B<float>(b, 8),
                 B<float>(b, 9), B<u8>(b, 10), B<float>(b, 11), B<float>(b, 12), B<float>(b, 13), B<u8>(b, 14),
                 A<GptqSweepArgs>(b, 15), p.grid_pos.x);
});
}  // namespace
}  // namespace mh

extern "C" {

// Runs kernel `name` over groups (gx, gy, gz) of (tx, ty, tz) threads with buffers[0..nbuf) bound to
// [[buffer(0..nbuf))]]. Returns 0, or -1 with a message in err.
__attribute__((visibility("default"))) int mh_launch(const char* name, void** buffers, int nbuf, unsigned gx,
                                                     unsigned gy, unsigned gz, unsigned tx, unsigned ty, unsigned tz,
                                                     unsigned skew_us, char* err, int errlen) {
  (void)nbuf;
  try {
    auto it = mh::table().find(name);
    if (it == mh::table().end()) {
      std::snprintf(err, errlen, "no kernel named %s in the harness", name);
      return -1;
    }
    const mh::Entry& fn = it->second;
    mh::LaunchOptions opt;
    opt.skew_us = skew_us;
    mh::launch(mh::Dim3{gx, gy, gz}, mh::Dim3{tx, ty, tz}, opt, [&](const mh::Pos& p) { fn(buffers, p); });
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return -1;
  }
}

__attribute__((visibility("default"))) int mh_kernel_count() { return static_cast<int>(mh::table().size()); }
}
