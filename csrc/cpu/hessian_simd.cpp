// SIMD micro-kernels of calibra::hessian_accumulate (see hessian_kernels.h). Every function marked
// CALIBRA_AVX512 / CALIBRA_AVX2 below is compiled for that ISA only; they are called only after a run-time CPU check,
// so the library itself still runs on any x86-64. Non-x86 builds get stubs that are never selected.
#include "hessian_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CALIBRA_HESSIAN_X86 1
#endif

namespace calibra {
namespace hessian_detail {

#ifdef CALIBRA_HESSIAN_X86

namespace {

// Function-level targets (GCC and clang): only these functions use AVX-512 / AVX2 instructions.
#define CALIBRA_AVX512 __attribute__((target("avx512f,avx512vl,fma")))
#define CALIBRA_AVX2 __attribute__((target("avx2,fma")))

// The tile: NR rows (broadcast side) x 2 vectors (vector side), all NR*2 accumulators in registers.
// Ops supplies the vector type and its operations.
#define CALIBRA_MICRO_KERNEL_BODY(Ops, NR)                                                   \
  using V = typename Ops::V;                                                                 \
  constexpr int W = Ops::W;                                                                  \
  V acc0[NR], acc1[NR];                                                                      \
  _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {                                    \
    acc0[r] = Ops::zero();                                                                   \
    acc1[r] = Ops::zero();                                                                   \
    Ops::prefetch(c + r * ldc);                                                              \
    Ops::prefetch(c + r * ldc + 2 * W - 1);                                                  \
  }                                                                                          \
  for (int64_t k = 0; k < kc; ++k) {                                                         \
    const V a0 = Ops::load(a);                                                               \
    const V a1 = Ops::load(a + W);                                                           \
    _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {                                  \
      const V br = Ops::bcast(b + r);                                                        \
      acc0[r] = Ops::fma(a0, br, acc0[r]);                                                   \
      acc1[r] = Ops::fma(a1, br, acc1[r]);                                                   \
    }                                                                                        \
    a += 2 * W;                                                                              \
    b += NR;                                                                                 \
  }                                                                                          \
  _Pragma("GCC unroll 16") for (int r = 0; r < NR; ++r) {                                    \
    auto* cr = c + r * ldc;                                                                  \
    Ops::storeu(cr, Ops::add(Ops::loadu(cr), acc0[r]));                                      \
    Ops::storeu(cr + W, Ops::add(Ops::loadu(cr + W), acc1[r]));                              \
  }


struct F32x16 {
  using V = __m512;
  static constexpr int W = 16;
  CALIBRA_AVX512 static inline V zero() { return _mm512_setzero_ps(); }
  CALIBRA_AVX512 static inline V load(const float* p) { return _mm512_load_ps(p); }
  CALIBRA_AVX512 static inline V loadu(const float* p) { return _mm512_loadu_ps(p); }
  CALIBRA_AVX512 static inline void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  CALIBRA_AVX512 static inline V bcast(const float* p) { return _mm512_set1_ps(*p); }
  CALIBRA_AVX512 static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  CALIBRA_AVX512 static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  CALIBRA_AVX512 static inline void prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
};

struct F64x8 {
  using V = __m512d;
  static constexpr int W = 8;
  CALIBRA_AVX512 static inline V zero() { return _mm512_setzero_pd(); }
  CALIBRA_AVX512 static inline V load(const double* p) { return _mm512_load_pd(p); }
  CALIBRA_AVX512 static inline V loadu(const double* p) { return _mm512_loadu_pd(p); }
  CALIBRA_AVX512 static inline void storeu(double* p, V v) { _mm512_storeu_pd(p, v); }
  CALIBRA_AVX512 static inline V bcast(const double* p) { return _mm512_set1_pd(*p); }
  CALIBRA_AVX512 static inline V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  CALIBRA_AVX512 static inline V add(V a, V b) { return _mm512_add_pd(a, b); }
  CALIBRA_AVX512 static inline void prefetch(const double* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
};

CALIBRA_AVX512 void micro_f32_avx512_impl(int64_t kc, const float* __restrict a, const float* __restrict b, float* __restrict c,
                           int64_t ldc) {
  CALIBRA_MICRO_KERNEL_BODY(F32x16, kAvx512NR)
}

CALIBRA_AVX512 void micro_f64_avx512_impl(int64_t kc, const double* __restrict a, const double* __restrict b,
                           double* __restrict c, int64_t ldc) {
  CALIBRA_MICRO_KERNEL_BODY(F64x8, kAvx512NR)
}

// Rows [r0, r1) of the upper triangle from the lower one, in 64-column slabs so that the 16-row
// band of lower-triangle lines each slab gathers from stays in L1 across the rows.
template <class T, int W, class Gather>
CALIBRA_AVX512 inline void mirror_rows_impl(T* H, int64_t d, int64_t r0, int64_t r1, __m512i idx) {
  for (int64_t c0 = r0 + 1; c0 < d; c0 += 64) {
    const int64_t c1 = c0 + 64 < d ? c0 + 64 : d;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t c = c0 > r + 1 ? c0 : r + 1;
      T* dst = H + r * d;
      for (; c + W <= c1; c += W) Gather::copy(dst + c, H + c * d + r, idx);
      for (; c < c1; ++c) dst[c] = H[c * d + r];
    }
  }
}

struct GatherF32 {  // dst[0..16) = src[0], src[d], ..., src[15 d]
  CALIBRA_AVX512 static inline void copy(float* dst, const float* src, __m512i ix) {
    _mm512_storeu_ps(dst, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), static_cast<__mmask16>(0xffff), ix, src, 4));
  }
};
struct GatherF64 {
  CALIBRA_AVX512 static inline void copy(double* dst, const double* src, __m512i ix) {
    _mm512_storeu_pd(dst, _mm512_mask_i64gather_pd(_mm512_setzero_pd(), static_cast<__mmask8>(0xff), ix, src, 8));
  }
};

CALIBRA_AVX512 void mirror_rows_f32(float* H, int64_t d, int64_t r0, int64_t r1) {
  const int s = static_cast<int>(d);  // callers guarantee 15 * d < 2^31
  const __m512i idx = _mm512_set_epi32(15 * s, 14 * s, 13 * s, 12 * s, 11 * s, 10 * s, 9 * s, 8 * s, 7 * s, 6 * s,
                                       5 * s, 4 * s, 3 * s, 2 * s, s, 0);
  mirror_rows_impl<float, 16, GatherF32>(H, d, r0, r1, idx);
}

CALIBRA_AVX512 void mirror_rows_f64(double* H, int64_t d, int64_t r0, int64_t r1) {
  const __m512i idx = _mm512_set_epi64(7 * d, 6 * d, 5 * d, 4 * d, 3 * d, 2 * d, d, 0);
  mirror_rows_impl<double, 8, GatherF64>(H, d, r0, r1, idx);
}



struct F32x8 {
  using V = __m256;
  static constexpr int W = 8;
  CALIBRA_AVX2 static inline V zero() { return _mm256_setzero_ps(); }
  CALIBRA_AVX2 static inline V load(const float* p) { return _mm256_load_ps(p); }
  CALIBRA_AVX2 static inline V loadu(const float* p) { return _mm256_loadu_ps(p); }
  CALIBRA_AVX2 static inline void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  CALIBRA_AVX2 static inline V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  CALIBRA_AVX2 static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  CALIBRA_AVX2 static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  CALIBRA_AVX2 static inline void prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
};

struct F64x4 {
  using V = __m256d;
  static constexpr int W = 4;
  CALIBRA_AVX2 static inline V zero() { return _mm256_setzero_pd(); }
  CALIBRA_AVX2 static inline V load(const double* p) { return _mm256_load_pd(p); }
  CALIBRA_AVX2 static inline V loadu(const double* p) { return _mm256_loadu_pd(p); }
  CALIBRA_AVX2 static inline void storeu(double* p, V v) { _mm256_storeu_pd(p, v); }
  CALIBRA_AVX2 static inline V bcast(const double* p) { return _mm256_broadcast_sd(p); }
  CALIBRA_AVX2 static inline V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  CALIBRA_AVX2 static inline V add(V a, V b) { return _mm256_add_pd(a, b); }
  CALIBRA_AVX2 static inline void prefetch(const double* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
};

CALIBRA_AVX2 void micro_f32_avx2_impl(int64_t kc, const float* __restrict a, const float* __restrict b, float* __restrict c,
                         int64_t ldc) {
  CALIBRA_MICRO_KERNEL_BODY(F32x8, kAvx2NR)
}

CALIBRA_AVX2 void micro_f64_avx2_impl(int64_t kc, const double* __restrict a, const double* __restrict b, double* __restrict c,
                         int64_t ldc) {
  CALIBRA_MICRO_KERNEL_BODY(F64x4, kAvx2NR)
}


#undef CALIBRA_MICRO_KERNEL_BODY
#undef CALIBRA_AVX512
#undef CALIBRA_AVX2

}  // namespace

void micro_f32_avx512(int64_t kc, const float* a, const float* b, float* c, int64_t ldc) {
  micro_f32_avx512_impl(kc, a, b, c, ldc);
}
void micro_f64_avx512(int64_t kc, const double* a, const double* b, double* c, int64_t ldc) {
  micro_f64_avx512_impl(kc, a, b, c, ldc);
}
void micro_f32_avx2(int64_t kc, const float* a, const float* b, float* c, int64_t ldc) {
  micro_f32_avx2_impl(kc, a, b, c, ldc);
}
void micro_f64_avx2(int64_t kc, const double* a, const double* b, double* c, int64_t ldc) {
  micro_f64_avx2_impl(kc, a, b, c, ldc);
}

void mirror_rows_f32_avx512(float* H, int64_t d, int64_t r0, int64_t r1) { mirror_rows_f32(H, d, r0, r1); }
void mirror_rows_f64_avx512(double* H, int64_t d, int64_t r0, int64_t r1) { mirror_rows_f64(H, d, r0, r1); }

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#else  // not x86-64: the portable kernel in hessian.cpp serves every call

void micro_f32_avx512(int64_t, const float*, const float*, float*, int64_t) {}
void micro_f64_avx512(int64_t, const double*, const double*, double*, int64_t) {}
void micro_f32_avx2(int64_t, const float*, const float*, float*, int64_t) {}
void micro_f64_avx2(int64_t, const double*, const double*, double*, int64_t) {}
void mirror_rows_f32_avx512(float*, int64_t, int64_t, int64_t) {}
void mirror_rows_f64_avx512(double*, int64_t, int64_t, int64_t) {}
bool cpu_has_avx512() { return false; }
bool cpu_has_avx2() { return false; }

#endif

}  // namespace hessian_detail
}  // namespace calibra
