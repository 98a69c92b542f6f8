// calibra::hessian_accumulate on CPU: a symmetric rank-k update H += X^T X (SYRK), lower triangle only.
//
// Structure (GotoBLAS-style, specialised to A = X^T, B = X):
//   for each chunk of kc rows of X:
//     pack the chunk into vector-side panels V[q][k][MR] (converting fp16/bf16/fp64 to H's dtype) and
//     broadcast-side panels S[s][k][NR] (built from V, so every x element is converted once);
//     split H's lower triangle into BS x BS blocks (BS a multiple of MR and NR), handed to the threads
//     one at a time from a shared counter (diagonal blocks cost half, so static splits would idle);
//     in a block: for each NR-row panel (it stays in L1), for each MR-column panel left of the
//     diagonal (the block's V panels stay in L2): the register-blocked micro-kernel adds the tile's
//     kc-term dot products into H.
//   finally mirror the lower triangle onto the upper one, so H is exactly symmetric.
// Micro-kernels: AVX-512 (fp32 32x12, fp64 16x12), AVX2 (16x6, 8x6), portable (8x4), chosen at run
// time (see hessian_kernels.h). CALIBRA_CPU_ISA=avx2|portable forces a lower ISA (for tests/benchmarks).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "calibra/elementwise.h"
#include "calibra/parallel.h"
#include "calibra/params/hessian.h"
#include "hessian_kernels.h"

namespace calibra {
namespace {

using hessian_detail::KernelInfo;

constexpr int kPortableMR = 8;
constexpr int kPortableNR = 4;
constexpr int kMaxMR = 32;
constexpr int kMaxNR = 12;

template <class T, int MR, int NR>
void micro_portable(int64_t kc, const T* a, const T* b, T* c, int64_t ldc) {
  T acc[NR][MR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    for (int r = 0; r < NR; ++r) {
      const T br = b[k * NR + r];
      for (int j = 0; j < MR; ++j) acc[r][j] += br * a[k * MR + j];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < MR; ++j) c[r * ldc + j] += acc[r][j];
}

enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
  static const Isa hw = hessian_detail::cpu_has_avx512() ? Isa::kAvx512
                        : hessian_detail::cpu_has_avx2() ? Isa::kAvx2
                                                         : Isa::kPortable;
  Isa isa = hw;
  if (const char* env = std::getenv("CALIBRA_CPU_ISA")) {  // may only lower the ISA
    Isa want = hw;
    if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
    else if (std::strcmp(env, "portable") == 0 || std::strcmp(env, "scalar") == 0) want = Isa::kPortable;
    isa = static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
  }
  return isa;
}

template <class T>
KernelInfo<T> pick_kernel() {
  using namespace hessian_detail;
  const Isa isa = best_isa();
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::kAvx512) return {&micro_f32_avx512, 32, kAvx512NR, "avx512", &mirror_rows_f32_avx512};
    if (isa == Isa::kAvx2) return {&micro_f32_avx2, 16, kAvx2NR, "avx2", nullptr};
  } else {
    if (isa == Isa::kAvx512) return {&micro_f64_avx512, 16, kAvx512NR, "avx512", &mirror_rows_f64_avx512};
    if (isa == Isa::kAvx2) return {&micro_f64_avx2, 8, kAvx2NR, "avx2", nullptr};
  }
  return {&micro_portable<T, kPortableMR, kPortableNR>, kPortableMR, kPortableNR, "portable", nullptr};
}

template <class T, class XT>
inline T convert(XT v) {
  if constexpr (std::is_same_v<XT, Half> || std::is_same_v<XT, BFloat16>) return static_cast<T>(to_float(v));
  else return static_cast<T>(v);
}

// Runs fn(i) for i in [0, n) on the pool, handing out indices from a shared counter.
template <class F>
void dynamic_for(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(num_threads(), n);
  parallel_for(workers, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      fn(i);
    }
  });
}

// 64-byte aligned scratch, kept per calling thread between calls.
template <class T>
T* scratch(size_t count) {
  thread_local std::vector<unsigned char> buf;
  const size_t bytes = count * sizeof(T) + 64;
  if (buf.size() < bytes) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(bytes);
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((p + 63) & ~static_cast<uintptr_t>(63));
}

int64_t lcm(int64_t a, int64_t b) {
  int64_t x = a, y = b;
  while (y) { const int64_t t = x % y; x = y; y = t; }
  return a / x * b;
}

template <class T>
void mirror_lower(T* H, int64_t d, hessian_detail::MirrorRows<T> rows_fn) {
  if (rows_fn != nullptr && 16 * d < (int64_t(1) << 31)) {
    constexpr int64_t R = 16;  // 16-row bands: the gathered lower-triangle lines are shared by the band
    dynamic_for((d + R - 1) / R, [&](int64_t b) { rows_fn(H, d, b * R, std::min(d, b * R + R)); });
    return;
  }
  constexpr int64_t B = 64;
  const int64_t nb = (d + B - 1) / B;
  dynamic_for(nb, [&](int64_t ib) {
    const int64_t r0 = ib * B, r1 = std::min(d, r0 + B);
    for (int64_t jb = ib; jb < nb; ++jb) {  // upper blocks (jb >= ib) of block row ib
      const int64_t c0 = jb * B, c1 = std::min(d, c0 + B);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = std::max(c0, r + 1); c < c1; ++c) H[r * d + c] = H[c * d + r];
    }
  });
}

template <class T, class XT>
void hessian_impl(const HessianParams& p, const KernelInfo<T>& K) {
  const int64_t d = p.x.size(-1);
  const int64_t N = p.x.rows();
  const int64_t cs = p.x.stride(-1);
  const int64_t MR = K.mr, NR = K.nr;
  // kc rows per chunk: the NR x kc broadcast panel (12 KiB fp32, 18 KiB fp64) stays in L1 and a
  // BS x kc block of vector-side panels (192 KiB, 288 KiB) in L2. BS: about 192, a multiple of MR and NR.
  const int64_t KC = std::is_same_v<T, float> ? 256 : 192;
  constexpr int64_t kBlockTarget = 192;
  const int64_t kc_max = std::min(N, KC);
  const int64_t nV = (d + MR - 1) / MR, nS = (d + NR - 1) / NR;
  const int64_t BS = lcm(MR, NR) * ((kBlockTarget + lcm(MR, NR) - 1) / lcm(MR, NR));
  const int64_t nb = (d + BS - 1) / BS;
  const int64_t units = nb * (nb + 1) / 2;

  const size_t v_count = static_cast<size_t>(nV * MR * kc_max);
  const size_t s_count = static_cast<size_t>(nS * NR * kc_max);
  T* vbuf = scratch<T>(v_count + s_count + 16);
  T* sbuf = vbuf + ((v_count + 15) / 16) * 16;  // keep 64-byte alignment
  std::vector<int64_t> rowoff(static_cast<size_t>(kc_max));
  std::vector<std::pair<int32_t, int32_t>> unit_list;
  unit_list.reserve(static_cast<size_t>(units));
  for (int64_t rb = nb - 1; rb >= 0; --rb)  // full (off-diagonal) blocks first, cheap ones last
    for (int64_t cb = 0; cb < rb; ++cb) unit_list.emplace_back(static_cast<int32_t>(rb), static_cast<int32_t>(cb));
  for (int64_t b = 0; b < nb; ++b) unit_list.emplace_back(static_cast<int32_t>(b), static_cast<int32_t>(b));

  const XT* x = p.x.ptr<const XT>();
  T* H = p.H.ptr<T>();
  const bool merged = p.x.leading_dims_mergeable();
  const int64_t rs = p.x.row_stride();

  for (int64_t n0 = 0; n0 < N; n0 += KC) {
    const int64_t kc = std::min(KC, N - n0);
    for (int64_t i = 0; i < kc; ++i) rowoff[i] = merged ? (n0 + i) * rs : p.x.row_offset(n0 + i);

    // Vector-side panels: V[q][k][j] = X[n0 + k, q*MR + j] (0 past d).
    parallel_for(nV, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t col0 = q * MR, w = std::min(MR, d - col0);
        T* dst = vbuf + q * kc * MR;
        for (int64_t k = 0; k < kc; ++k, dst += MR) {
          const XT* src = x + rowoff[k] + col0 * cs;
          if (cs == 1) for (int64_t j = 0; j < w; ++j) dst[j] = convert<T>(src[j]);
          else for (int64_t j = 0; j < w; ++j) dst[j] = convert<T>(src[j * cs]);
          for (int64_t j = w; j < MR; ++j) dst[j] = T(0);
        }
      }
    });
    // Broadcast-side panels from the vector-side ones: S[s][k][r] = X[n0 + k, s*NR + r].
    parallel_for(nS, 4, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        T* dst = sbuf + s * kc * NR;
        const T* src[kMaxNR];
        int64_t valid = 0;
        for (int64_t r = 0; r < NR; ++r) {
          const int64_t col = s * NR + r;
          if (col < d) { src[r] = vbuf + (col / MR) * kc * MR + col % MR; valid = r + 1; }
        }
        for (int64_t k = 0; k < kc; ++k, dst += NR) {
          for (int64_t r = 0; r < valid; ++r) dst[r] = src[r][k * MR];
          for (int64_t r = valid; r < NR; ++r) dst[r] = T(0);
        }
      }
    });

    dynamic_for(units, [&](int64_t u) {
      const int64_t rb = unit_list[u].first, cb = unit_list[u].second;
      const int64_t r_begin = rb * BS, r_end = std::min(d, r_begin + BS);
      const int64_t c_begin = cb * BS, c_end = std::min(d, c_begin + BS);
      alignas(64) T tmp[kMaxNR * kMaxMR];
      for (int64_t r0 = r_begin; r0 < r_end; r0 += NR) {
        const T* bp = sbuf + (r0 / NR) * kc * NR;
        for (int64_t c0 = c_begin; c0 < c_end && c0 <= r0 + NR - 1; c0 += MR) {
          const T* ap = vbuf + (c0 / MR) * kc * MR;
          if (r0 + NR <= d && c0 + MR <= d) {
            K.fn(kc, ap, bp, H + r0 * d + c0, d);
          } else {  // edge tile: compute into a scratch tile, add its valid part
            std::fill(tmp, tmp + NR * MR, T(0));
            K.fn(kc, ap, bp, tmp, MR);
            const int64_t nr = std::min(NR, d - r0), mr = std::min(MR, d - c0);
            for (int64_t r = 0; r < nr; ++r)
              for (int64_t j = 0; j < mr; ++j) H[(r0 + r) * d + c0 + j] += tmp[r * MR + j];
          }
        }
      }
    });
  }
  mirror_lower(H, d, K.mirror);
}

}  // namespace

Status hessian_accumulate_cpu(const HessianParams& p) {
  CALIBRA_RETURN_IF_ERROR(check_hessian_accumulate(p));
  const int64_t d = p.x.size(-1);
  if (p.x.rows() == 0 || d == 0) return Status::Ok();
  if (p.H.dtype == DType::F32) {
    const KernelInfo<float> k = pick_kernel<float>();
    dispatch_floating(p.x.dtype, [&](auto tag) { hessian_impl<float, decltype(tag)>(p, k); });
  } else {
    const KernelInfo<double> k = pick_kernel<double>();
    dispatch_floating(p.x.dtype, [&](auto tag) { hessian_impl<double, decltype(tag)>(p, k); });
  }
  return Status::Ok();
}

const char* hessian_accumulate_cpu_isa() { return best_isa() == Isa::kAvx512 ? "avx512" : best_isa() == Isa::kAvx2 ? "avx2" : "portable"; }

}  // namespace calibra
