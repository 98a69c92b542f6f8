// calibra::hadamard on CPU: per row and block, load into an fp32 scratch buffer, run the in-place
// butterflies (the inner loop over j is contiguous, so it vectorizes for h >= the vector width),
// scale, store. Rows are spread over the thread pool.
#include <cmath>
#include <vector>

#include "calibra/elementwise.h"
#include "calibra/parallel.h"
#include "calibra/params/hadamard.h"

namespace calibra {
namespace {

template <class C>
void fwht_inplace(C* a, int64_t b) {
  // Same butterfly order as the reference: stride h = 1, 2, 4, ...; pairs (j, j + h).
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
}

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
    std::vector<C> buf(static_cast<size_t>(b));
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + p.x.row_offset(r);
      T* orow = out + r * n;
      for (int64_t k = 0; k < n; k += b) {
        for (int64_t j = 0; j < b; ++j) buf[j] = static_cast<C>(to_float(xr[(k + j) * col_stride]));
        fwht_inplace(buf.data(), b);
        for (int64_t j = 0; j < b; ++j) {
          if constexpr (std::is_same_v<T, double>) orow[k + j] = buf[j] * scale;
          else orow[k + j] = from_float<T>(buf[j] * scale);
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
