// calibra::hadamard on CPU. Per row and Hadamard block: load into an aligned fp32 scratch buffer,
// run the butterflies in place, scale, store. Rows are spread over the thread pool.
//
// Speed: the transform is a few adds per element per stage, so the work is keeping the SIMD units
// fed. The three smallest strides (h = 1, 2, 4) live inside one 8-float vector and are done with
// shuffles in registers; the larger strides go two stages at a time (radix-4), which halves the
// loads/stores of the scratch buffer. Every add and subtract happens in the same order as in the
// radix-2 reference, so fp32 results are bit-identical to calibra.ops._ref.hadamard.
// The fp32 kernel is compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#include "calibra/elementwise.h"
#include "calibra/parallel.h"
#include "calibra/params/hadamard.h"

namespace calibra {
namespace {

// 8-float vectors with GCC/clang vector extensions; the helpers below are internal and always
// inlined, so the "AVX vector return changes the ABI" note does not concern us.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CALIBRA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CALIBRA_SIMD_CLONES
#endif

__attribute__((always_inline)) inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof(v)); return v; }
__attribute__((always_inline)) inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// Stages h = 1, 2, 4 on each run of 8 floats (b >= 8), then h = 8, 16, ... two at a time.
CALIBRA_SIMD_CLONES
void fwht_f32(float* a, int64_t b, float scale) {
  const v8i lo1 = {0, 0, 2, 2, 4, 4, 6, 6}, hi1 = {1, 1, 3, 3, 5, 5, 7, 7};
  const v8i lo2 = {0, 1, 0, 1, 4, 5, 4, 5}, hi2 = {2, 3, 2, 3, 6, 7, 6, 7};
  const v8i lo4 = {0, 1, 2, 3, 0, 1, 2, 3}, hi4 = {4, 5, 6, 7, 4, 5, 6, 7};
  const v8f s1 = {1, -1, 1, -1, 1, -1, 1, -1};
  const v8f s2 = {1, 1, -1, -1, 1, 1, -1, -1};
  const v8f s4 = {1, 1, 1, 1, -1, -1, -1, -1};
  // u + (-1 * v) is exactly u - v, so the sign vectors reproduce the reference's subtractions.
  for (int64_t i = 0; i < b; i += 8) {
    v8f x = load8(a + i);
    x = __builtin_shuffle(x, lo1) + __builtin_shuffle(x, hi1) * s1;
    x = __builtin_shuffle(x, lo2) + __builtin_shuffle(x, hi2) * s2;
    x = __builtin_shuffle(x, lo4) + __builtin_shuffle(x, hi4) * s4;
    store8(a + i, x);
  }
  int64_t h = 8;
  for (; 4 * h <= b; h *= 4) {  // stages h and 2h together
    for (int64_t i = 0; i < b; i += 4 * h) {
      float* p0 = a + i;
      float* p1 = p0 + h;
      float* p2 = p1 + h;
      float* p3 = p2 + h;
      for (int64_t j = 0; j < h; j += 8) {
        const v8f x0 = load8(p0 + j), x1 = load8(p1 + j), x2 = load8(p2 + j), x3 = load8(p3 + j);
        const v8f y0 = x0 + x1, y1 = x0 - x1, y2 = x2 + x3, y3 = x2 - x3;  // stage h
        store8(p0 + j, y0 + y2);                                          // stage 2h
        store8(p2 + j, y0 - y2);
        store8(p1 + j, y1 + y3);
        store8(p3 + j, y1 - y3);
      }
    }
  }
  if (h < b) {  // one radix-2 stage left
    for (int64_t j = 0; j < h; j += 8) {
      const v8f u = load8(a + j), v = load8(a + h + j);
      store8(a + j, u + v);
      store8(a + h + j, u - v);
    }
  }
  const v8f sv = {scale, scale, scale, scale, scale, scale, scale, scale};
  for (int64_t i = 0; i < b; i += 8) store8(a + i, load8(a + i) * sv);
}

// Generic radix-2 butterflies (fp64, and blocks shorter than 8), same order as the reference.
template <class C>
void fwht_generic(C* a, int64_t b, C scale) {
  for (int64_t h = 1; h < b; h <<= 1) {
    for (int64_t i = 0; i < b; i += 2 * h) {
      C* lo = a + i;
      C* hi = a + i + h;
      for (int64_t j = 0; j < h; ++j) {
        const C u = lo[j], v = hi[j];
        lo[j] = u + v;
        hi[j] = u - v;
      }
    }
  }
  for (int64_t j = 0; j < b; ++j) a[j] *= scale;
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

template <class T>
void hadamard_rows(const HadamardParams& p, int64_t b) {
  using C = typename ComputeType<T>::type;
  const int64_t n = p.x.size(-1);
  const int64_t rows = p.x.rows();
  const int64_t col_stride = p.x.stride(-1);
  const T* x = p.x.ptr<const T>();
  T* out = p.out.ptr<T>();
  const C scale = static_cast<C>(1.0 / std::sqrt(static_cast<double>(b)));
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
    const size_t bytes = ((static_cast<size_t>(b) * sizeof(C)) + 63) / 64 * 64;
    std::unique_ptr<C, FreeDeleter> holder(static_cast<C*>(std::aligned_alloc(64, bytes)));
    C* buf = holder.get();
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + p.x.row_offset(r);
      T* orow = out + r * n;
      for (int64_t k = 0; k < n; k += b) {
        if constexpr (std::is_same_v<T, float>) {
          if (col_stride == 1) std::memcpy(buf, xr + k, static_cast<size_t>(b) * sizeof(float));
          else for (int64_t j = 0; j < b; ++j) buf[j] = xr[(k + j) * col_stride];
        } else {
          for (int64_t j = 0; j < b; ++j) buf[j] = static_cast<C>(to_float(xr[(k + j) * col_stride]));
        }
        if constexpr (std::is_same_v<C, float>) {
          if (b >= 8) fwht_f32(buf, b, scale);
          else fwht_generic(buf, b, scale);
        } else {
          fwht_generic(buf, b, scale);
        }
        if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
          std::memcpy(orow + k, buf, static_cast<size_t>(b) * sizeof(T));
        } else {
          for (int64_t j = 0; j < b; ++j) orow[k + j] = from_float<T>(buf[j]);
        }
      }
    }
  });
}

}  // namespace

Status hadamard_cpu(const HadamardParams& p) {
  if (p.x.ndim < 1 || p.x.dtype != p.out.dtype || p.out.numel() != p.x.numel() || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[hadamard] out must be a contiguous tensor shaped and typed like x");
  const int64_t n = p.x.size(-1);
  const int64_t b = p.block_size == -1 ? n : p.block_size;
  if (b < 1 || n % b != 0 || (b & (b - 1)) != 0)
    return make_status(StatusCode::kInvalidArgument,
                       "[hadamard] block_size %lld must be a power of two dividing the last dim %lld",
                       static_cast<long long>(b), static_cast<long long>(n));
  if (p.x.numel() == 0) return Status::Ok();
  bool ok = dispatch_floating(p.x.dtype, [&](auto tag) { hadamard_rows<decltype(tag)>(p, b); });
  if (!ok)
    return make_status(StatusCode::kInvalidArgument, "[hadamard] x must be floating point, got %s", dtype_name(p.x.dtype));
  return Status::Ok();
}

}  // namespace calibra
