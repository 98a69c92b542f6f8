// calibra::gptq_block_sweep on CUDA: one warp per output row (rows are independent in GPTQ's sweep; H
// couples only columns). The warp keeps its row's working values in its row of `q` (column i is overwritten
// by its quantized value once processed, later columns hold the error-updated weights), and its parameter
// table in its rows of scales_out / zeros_out. Per column i, lane 0 does the serial part (the group's fit,
// quantizing x[i], the scaled error e) and broadcasts e; then the 32 lanes update the later columns
// j = i+1+lane, i+33+lane, ...: consecutive addresses of the row of q and of U's row i, so every access
// is coalesced (the first kernel ran one thread per row: stride-C accesses and R/32 warps in all). Each
// element still receives the same updates in the same order with the same arithmetic as the CPU kernel
// and calibra.ops._ref.gptq (__fdiv_rn / __fmul_rn / __fsub_rn, no FMA), so the results are meant to be
// bit-identical. Compile-checked, not yet run on a GPU.
//
// calibra::sparsegpt_block_sweep is the same kernel with N:M selection on (Args::nm_m > 0): at each
// group's first column lane 0 ranks the group's m saliencies of its row (pairwise rule of
// params/gptq.h; staged in the row's not-yet-written err entries, which keeps the kernel free of
// register spills) into a 32-bit prune mask, broadcast to the warp, and writes the chosen mask to `prune`.
#include <cstdint>

#include "calibra/fp4.h"
#include "calibra/params/gptq.h"
#include "calibra/params/gptq_checks.h"
#include "calibra/quant_math.h"
#include "common.cuh"

namespace calibra {
namespace {

constexpr int kThreads = 128;  // 4 warps: 4 rows per block
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct Args {
  const float* w;
  const float* u;
  const float* scales;
  const float* zeros;
  const int32_t* group;
  const int32_t* fit;
  const uint8_t* mask;  // nullptr: none
  const float* shrink;
  float* q;
  uint8_t* codes;
  float* err;
  float* scales_out;
  float* zeros_out;
  unsigned long long* flag;
  uint8_t* prune;  // sparsegpt_block_sweep: [R, C] bool output; nullptr for gptq_block_sweep
  int64_t rows, cols, groups, nshrink, nm_n, nm_m;
  float maxq, global_scale;
  int format, symmetric, scale_dtype;
};

__device__ __forceinline__ float round_scale_dev(int dt, float s) {
  float r = s;
  if (dt == static_cast<int>(DType::F16)) r = __half2float(__float2half_rn(s));
  else if (dt == static_cast<int>(DType::BF16)) r = __bfloat162float(__float2bfloat16_rn(s));
  return r == 0.0f ? 1.0f : r;
}

// Quantize x with (s, z): returns the value, writes the code.
__device__ __forceinline__ float quant(const Args& a, float x, float s, float z, uint8_t* code) {
  if (a.format == static_cast<int>(SweepFormat::kNone)) {
    *code = 0;
    return x;
  }
  if (a.format == static_cast<int>(SweepFormat::kInt)) {
    float q = __fdiv_rn(x, s);
    q = q < -qmath::kClampRound ? -qmath::kClampRound : (q > qmath::kClampRound ? qmath::kClampRound : q);
    q = __fadd_rn(__fsub_rn(__fadd_rn(q, qmath::kMagic), qmath::kMagic), z);
    q = q < 0.0f ? 0.0f : (q > a.maxq ? a.maxq : q);
    *code = static_cast<uint8_t>(q);
    return __fmul_rn(__fsub_rn(q, z), s);
  }
  const float d = __fdiv_rn(s, a.global_scale);
  if (d == 0.0f) {
    *code = 0;
    return 0.0f;
  }
  const uint8_t c = fp4::e2m1_encode(__fdiv_rn(x, d));
  *code = c;
  return __fmul_rn(fp4::e2m1_decode(c), d);
}

__device__ void fit_row(const Args& a, const float* x, int64_t n, float* s_out, float* z_out) {
  if (a.format == static_cast<int>(SweepFormat::kNone)) {
    *s_out = 1.0f;
    *z_out = 0.0f;
    return;
  }
  float mn = 0.0f, mx = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    const float v = x[c];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  float best_e = 0.0f;
  for (int64_t k = 0; k < a.nshrink; ++k) {
    const float p = a.shrink[k];
    float s, z;
    if (a.format == static_cast<int>(SweepFormat::kInt)) {
      const float mnp = __fmul_rn(mn, p), mxp = __fmul_rn(mx, p);
      const bool sym = a.symmetric != 0;
      float raw;
      if (sym) raw = __fdiv_rn(__fmul_rn(2.0f, -mnp > mxp ? -mnp : mxp), a.maxq);
      else raw = __fdiv_rn(__fsub_rn(mxp, mnp), a.maxq);
      s = round_scale_dev(a.scale_dtype, raw);
      if (sym) {
        z = __fdiv_rn(__fadd_rn(a.maxq, 1.0f), 2.0f);
      } else {
        z = __fsub_rn(__fadd_rn(__fdiv_rn(-mnp, s), qmath::kMagic), qmath::kMagic);
        z = z < 0.0f ? 0.0f : (z > a.maxq ? a.maxq : z);
      }
    } else {
      const float am = __fmul_rn(-mn > mx ? -mn : mx, p);
      if (a.format == static_cast<int>(SweepFormat::kNvfp4))
        s = fp4::e4m3_to_float(fp4::e4m3_from_float(__fmul_rn(__fdiv_rn(am, 6.0f), a.global_scale)));
      else
        s = am == 0.0f ? 0.0f : fp4::exp2_int(fp4::mx_exponent(am));
      z = 0.0f;
    }
    if (a.nshrink == 1) {
      *s_out = s;
      *z_out = z;
      return;
    }
    float e = 0.0f;
    uint8_t code;
    for (int64_t c = 0; c < n; ++c) {
      const float diff = __fsub_rn(quant(a, x[c], s, z, &code), x[c]);
      e = __fadd_rn(e, __fmul_rn(diff, diff));
    }
    if (k == 0 || e < best_e) {
      best_e = e;
      *s_out = s;
      *z_out = z;
    }
  }
}

// The prune mask (bit c = prune column i + c) of the group of m columns at i:
// rank(c) = #{k: s_k > s_c} + #{k < c: s_k == s_c}; prune where rank >= n. The group's saliencies
// x_j^2 / (u_jj * u_jj) are staged in the row's err[i, i + m), which the sweep writes only later.
__device__ __forceinline__ uint32_t select_nm(const Args& a, const float* x, float* sal, int64_t i) {
  const int m = static_cast<int>(a.nm_m), n = static_cast<int>(a.nm_n);
  const float* ud = a.u + i * (a.cols + 1);
  for (int c = 0; c < m; ++c) {
    const float d = ud[c * (a.cols + 1)];
    sal[c] = __fdiv_rn(__fmul_rn(x[c], x[c]), __fmul_rn(d, d));
  }
  uint32_t bits = 0;
  for (int c = 0; c < m; ++c) {
    const float sc = sal[c];
    int rank = 0;
    for (int k = 0; k < c; ++k) rank += sal[k] >= sc;
    for (int k = c + 1; k < m; ++k) rank += sal[k] > sc;
    bits |= static_cast<uint32_t>(rank >= n) << c;
  }
  return bits;
}

__global__ void __launch_bounds__(kThreads) sweep_kernel(Args a) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (r >= a.rows) return;  // the whole warp: r is the same on its 32 lanes
  const int64_t C = a.cols, G = a.groups;
  float* x = a.q + r * C;
  for (int64_t c = lane; c < C; c += kWarp) x[c] = a.w[r * C + c];
  float* S = a.scales_out + r * G;
  float* Z = a.zeros_out + r * G;
  for (int64_t g = lane; g < G; g += kWarp) {
    S[g] = a.scales[r * G + g];
    Z[g] = a.zeros[r * G + g];
  }
  __syncwarp();  // lane 0 reads what the other lanes copied
  uint32_t group_prune = 0;
  int gpos = 0;  // i % nm_m, kept as a counter (a 64-bit modulo would be a call)
  for (int64_t i = 0; i < C; ++i) {
    const int32_t g = a.group[i], f = a.fit[i];
    if (g < 0 || g >= G || f < 0 || i + f > C) {  // the same on every lane: the warp leaves together
      if (lane == 0) atomicMin(a.flag, static_cast<unsigned long long>(i));
      return;
    }
    bool pruned;
    if (a.prune != nullptr) {
      if (gpos == 0) {
        uint32_t bits = 0;
        if (lane == 0) bits = select_nm(a, x + i, a.err + r * C + i, i);
        group_prune = __shfl_sync(kFullMask, bits, 0);
      }
      pruned = (group_prune >> gpos) & 1u;
      gpos = gpos + 1 == a.nm_m ? 0 : gpos + 1;
    } else {
      pruned = a.mask != nullptr && a.mask[r * C + i];
    }
    float e = 0.0f;
    if (lane == 0) {
      if (a.prune != nullptr) a.prune[r * C + i] = pruned ? 1 : 0;
      if (f > 0) fit_row(a, x + i, f, S + g, Z + g);
      uint8_t code;
      const float xi = x[i];
      float v = quant(a, xi, S[g], Z[g], &code);
      if (pruned) {
        v = 0.0f;
        code = a.format == static_cast<int>(SweepFormat::kInt) ? static_cast<uint8_t>(Z[g]) : 0;
      }
      e = __fdiv_rn(__fsub_rn(xi, v), a.u[i * C + i]);
      x[i] = v;
      a.codes[r * C + i] = code;
      a.err[r * C + i] = e;
    }
    e = __shfl_sync(kFullMask, e, 0);
    const float* ui = a.u + i * C;
    for (int64_t j = i + 1 + lane; j < C; j += kWarp) x[j] = __fsub_rn(x[j], __fmul_rn(e, ui[j]));
    __syncwarp();  // column i+1 (lane 0's next read) and the next fit's columns were written by other lanes
  }
}

// The shared entry: nm_m == 0 is gptq_block_sweep, nm_m > 0 sparsegpt_block_sweep (prune: its output).
Status run_sweep(const GptqSweepParams& p, const char* op, int64_t nm_n, int64_t nm_m, const TensorArg* prune,
                 cudaStream_t stream) {
  CALIBRA_RETURN_IF_ERROR(gptq_checks::check_sweep(p, op, nm_n, nm_m, prune));
  const int64_t R = p.w.shape[0], C = p.w.shape[1], G = p.scales.shape[1];
  if (p.error_flag.ndim != 1 || p.error_flag.dtype != DType::I64)
    return make_status(StatusCode::kInvalidArgument, "%s error_flag must be int64 [1]", op);
  if (p.format == SweepFormat::kInt && (p.bits < 2 || p.bits > 8))
    return make_status(StatusCode::kInvalidArgument, "%s bits must be in [2, 8], got %lld", op, static_cast<long long>(p.bits));
  if (R == 0 || C == 0) return Status::Ok();
  Args a{p.w.ptr<const float>(), p.u.ptr<const float>(), p.scales.ptr<const float>(), p.zeros.ptr<const float>(),
         p.group.ptr<const int32_t>(), p.fit.ptr<const int32_t>(),
         p.mask.numel() ? p.mask.ptr<const uint8_t>() : nullptr, p.shrink.ptr<const float>(), p.q.ptr<float>(),
         p.codes.ptr<uint8_t>(), p.err.ptr<float>(), p.scales_out.ptr<float>(), p.zeros_out.ptr<float>(),
         p.error_flag.ptr<unsigned long long>(), prune ? prune->ptr<uint8_t>() : nullptr, R, C, G, p.shrink.shape[0],
         prune ? nm_n : 0, prune ? nm_m : 0,
         static_cast<float>((1 << p.bits) - 1), p.global_scale, static_cast<int>(p.format), p.symmetric ? 1 : 0,
         static_cast<int>(p.scale_dtype)};
  const int64_t blocks = cuda::ceil_div(R, kThreads / kWarp);
  sweep_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return cuda::launch_status(prune ? "sparsegpt_block_sweep" : "gptq_block_sweep");
}

}  // namespace

Status gptq_block_sweep_cuda(const GptqSweepParams& p, cudaStream_t stream) {
  return run_sweep(p, "[gptq_block_sweep]", 0, 0, nullptr, stream);
}

Status sparsegpt_block_sweep_cuda(const SparsegptSweepParams& p, cudaStream_t stream) {
  return run_sweep(p.sweep, "[sparsegpt_block_sweep]", p.n, p.m, &p.prune, stream);
}

}  // namespace calibra
