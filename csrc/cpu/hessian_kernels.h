// Register-blocked micro-kernels of calibra::hessian_accumulate (internal to csrc/cpu).
//
// A micro-kernel computes one MR x NR tile of the update from packed panels and adds it into C:
//   c[r * ldc + j] += sum_{k < kc} b[k * NR + r] * a[k * MR + j]      (r < NR, j < MR)
// `a` is the vector-side panel ([kc][MR], 64-byte aligned, its values become H columns), `b` the
// broadcast-side panel ([kc][NR], its values become H rows). FMAs are explicit (fused, one rounding
// per product-add); the sum runs over k in order.
//
// The SIMD variants live in their own files, compiled with function-level target attributes
// (never -march flags), and are picked at run time from what the CPU supports.
#pragma once
#include <cstdint>

namespace calibra {
namespace hessian_detail {

template <class T>
using MicroKernel = void (*)(int64_t kc, const T* a, const T* b, T* c, int64_t ldc);

template <class T>
using MirrorRows = void (*)(T* H, int64_t d, int64_t r0, int64_t r1);

template <class T>
struct KernelInfo {
  MicroKernel<T> fn;
  int mr;
  int nr;
  const char* isa;
  MirrorRows<T> mirror;  // null: the portable blocked copy
};

// AVX-512F (+VL, FMA): fp32 32x12 tile (24 zmm accumulators), fp64 16x12.
constexpr int kAvx512NR = 12;
void micro_f32_avx512(int64_t kc, const float* a, const float* b, float* c, int64_t ldc);
void micro_f64_avx512(int64_t kc, const double* a, const double* b, double* c, int64_t ldc);
// AVX2 + FMA: fp32 16x6 tile (12 ymm accumulators), fp64 8x6.
constexpr int kAvx2NR = 6;
void micro_f32_avx2(int64_t kc, const float* a, const float* b, float* c, int64_t ldc);
void micro_f64_avx2(int64_t kc, const double* a, const double* b, double* c, int64_t ldc);

// Mirror for rows [r0, r1): H[r][c] = H[c][r] for every c > r (AVX-512 gathers down the columns).
void mirror_rows_f32_avx512(float* H, int64_t d, int64_t r0, int64_t r1);
void mirror_rows_f64_avx512(double* H, int64_t d, int64_t r0, int64_t r1);

// True when the CPU (and OS) support the ISA of the variants above.
bool cpu_has_avx512();
bool cpu_has_avx2();

}  // namespace hessian_detail
}  // namespace calibra
