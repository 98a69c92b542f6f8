// calibra::nm_mask, calibra::compress_24, calibra::decompress_24 on CPU. Rows are spread over the
// thread pool. nm_mask ranks each group of m by pairwise comparison (the same rule as the reference,
// so ties resolve identically); the group size is a template parameter for the common m, so the
// comparisons unroll into straight-line (vectorizable) code. Data errors set a flag during the
// parallel pass; the first offender in row-major order is then found by a serial scan.
#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "calibra/elementwise.h"
#include "calibra/parallel.h"
#include "calibra/params/sparsity.h"

namespace calibra {
namespace {

// ---- nm_mask -------------------------------------------------------------------------------

template <int M>
inline void rank_group_fixed(const float* v, int n, uint8_t* out) {
  for (int j = 0; j < M; ++j) {
    int cnt = 0;
    for (int i = 0; i < M; ++i) cnt += static_cast<int>(v[i] > v[j]) + static_cast<int>((i < j) & (v[i] == v[j]));
    out[j] = static_cast<uint8_t>(cnt < n);
  }
}

inline void rank_group_any(const float* v, int m, int n, uint8_t* out) {
  for (int j = 0; j < m; ++j) {
    int cnt = 0;
    for (int i = 0; i < m; ++i) cnt += static_cast<int>(v[i] > v[j]) + static_cast<int>((i < j) & (v[i] == v[j]));
    out[j] = static_cast<uint8_t>(cnt < n);
  }
}

template <int M>
void rank_row_fixed(const float* v, int64_t k, int n, uint8_t* out) {
  for (int64_t g = 0; g < k; g += M) rank_group_fixed<M>(v + g, n, out + g);
}

void rank_row(const float* v, int64_t k, int m, int n, uint8_t* out) {
  switch (m) {
    case 4: rank_row_fixed<4>(v, k, n, out); return;
    case 8: rank_row_fixed<8>(v, k, n, out); return;
    case 16: rank_row_fixed<16>(v, k, n, out); return;
    case 32: rank_row_fixed<32>(v, k, n, out); return;
    default:
      for (int64_t g = 0; g < k; g += m) rank_group_any(v + g, m, n, out + g);
  }
}

template <class T>
bool nm_rows(const NmMaskParams& p) {
  const int64_t k = p.scores.size(-1);
  const int64_t rows = p.scores.rows();
  const int64_t cs = p.scores.stride(-1);
  const T* x = p.scores.ptr<const T>();
  uint8_t* out = p.out.ptr<uint8_t>();
  const int m = static_cast<int>(p.m), n = static_cast<int>(p.n);
  std::atomic<bool> any_nan{false};
  parallel_for(rows, std::max<int64_t>(1, 16384 / k), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(k));
    bool nan = false;
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + p.scores.row_offset(r);
      const float* v;
      if constexpr (std::is_same_v<T, float>) {
        if (cs == 1) {
          v = xr;
        } else {
          for (int64_t j = 0; j < k; ++j) buf[j] = xr[j * cs];
          v = buf.data();
        }
      } else {
        for (int64_t j = 0; j < k; ++j) buf[j] = to_float(xr[j * cs]);
        v = buf.data();
      }
      bool row_nan = false;
      for (int64_t j = 0; j < k; ++j) row_nan |= v[j] != v[j];
      nan |= row_nan;
      rank_row(v, k, m, n, out + r * k);
    }
    if (nan) any_nan.store(true, std::memory_order_relaxed);
  });
  return any_nan.load();
}

template <class T>
Status nan_status(const NmMaskParams& p) {
  const int64_t k = p.scores.size(-1), rows = p.scores.rows(), cs = p.scores.stride(-1);
  const T* x = p.scores.ptr<const T>();
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + p.scores.row_offset(r);
    for (int64_t j = 0; j < k; ++j) {
      const float v = to_float(xr[j * cs]);
      if (v != v) {
        std::string idx = std::to_string(j);
        int64_t rr = r;
        for (int d = p.scores.ndim - 2; d >= 0; --d) {
          idx = std::to_string(rr % p.scores.shape[d]) + ", " + idx;
          rr /= p.scores.shape[d];
        }
        return make_status(StatusCode::kInvalidArgument, "[nm_mask] scores must not contain NaN (found NaN at index [%s])",
                           idx.c_str());
      }
    }
  }
  return Status::Ok();
}

// ---- 2:4 -----------------------------------------------------------------------------------
// Storage types: float for float32; the raw uint16 bits for float16 / bfloat16 (values are only
// copied, and a 16-bit float is zero iff its bits without the sign are zero).
inline bool nonzero(float v) { return v != 0.0f; }
inline bool nonzero(uint16_t v) { return (v & 0x7fffu) != 0; }

template <class T>
bool compress_rows(const Compress24Params& p) {
  const int64_t R = p.w.shape[0], K = p.w.shape[1];
  const int64_t s0 = p.w.strides[0], s1 = p.w.strides[1];
  const T* w = p.w.ptr<const T>();
  T* vals = p.values.ptr<T>();
  uint16_t* meta = p.meta.ptr<uint16_t>();
  std::atomic<bool> any_bad{false};
  parallel_for(R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    bool bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      const T* wr = w + r * s0;
      T* vr = vals + r * (K / 2);
      for (int64_t j = 0; j < K / 16; ++j) {
        unsigned word = 0;
        for (int g = 0; g < 4; ++g) {
          const int64_t c = 16 * j + 4 * g;
          T v[4];
          unsigned nz = 0;
          for (int i = 0; i < 4; ++i) {
            v[i] = wr[(c + i) * s1];
            nz |= static_cast<unsigned>(nonzero(v[i])) << i;
          }
          bad |= __builtin_popcount(nz) > 2;
          unsigned sel = nz;
          while (__builtin_popcount(sel) < 2) sel |= ~sel & (sel + 1);  // add the lowest unused index
          if (__builtin_popcount(sel) > 2) sel = 0x3;                    // bad group: reported below
          const unsigned i0 = static_cast<unsigned>(__builtin_ctz(sel));
          const unsigned i1 = static_cast<unsigned>(__builtin_ctz(sel & (sel - 1)));
          vr[8 * j + 2 * g] = v[i0];
          vr[8 * j + 2 * g + 1] = v[i1];
          word |= (i0 | (i1 << 2)) << (4 * g);
        }
        meta[r * (K / 16) + j] = static_cast<uint16_t>(word);
      }
    }
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  });
  return any_bad.load();
}

template <class T>
Status not24_status(const Compress24Params& p) {
  const int64_t R = p.w.shape[0], K = p.w.shape[1];
  const T* w = p.w.ptr<const T>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < K; c += 4) {
      int cnt = 0;
      for (int i = 0; i < 4; ++i) cnt += nonzero(w[r * p.w.strides[0] + (c + i) * p.w.strides[1]]);
      if (cnt > 2)
        return make_status(StatusCode::kInvalidArgument, "[compress_24] w is not 2:4 sparse: row %lld, columns %lld..%lld hold %d nonzeros",
                           static_cast<long long>(r), static_cast<long long>(c), static_cast<long long>(c + 3), cnt);
    }
  return Status::Ok();
}

template <class T>
bool decompress_rows(const Decompress24Params& p) {
  const int64_t R = p.out.shape[0], K = p.out.shape[1];
  const int64_t vs0 = p.values.strides[0], vs1 = p.values.strides[1];
  const int64_t ms0 = p.meta.strides[0], ms1 = p.meta.strides[1];
  const T* vals = p.values.ptr<const T>();
  const uint16_t* meta = p.meta.ptr<const uint16_t>();
  T* out = p.out.ptr<T>();
  std::atomic<bool> any_bad{false};
  parallel_for(R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    bool bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      T* orow = out + r * K;
      for (int64_t j = 0; j < K / 16; ++j) {
        const unsigned word = meta[r * ms0 + j * ms1];
        for (int g = 0; g < 4; ++g) {
          const unsigned i0 = (word >> (4 * g)) & 3u, i1 = (word >> (4 * g + 2)) & 3u;
          bad |= i0 >= i1;
          T* o = orow + 16 * j + 4 * g;
          for (int i = 0; i < 4; ++i) o[i] = T{};
          o[i0 & 3u] = vals[r * vs0 + (8 * j + 2 * g) * vs1];
          o[i1 & 3u] = vals[r * vs0 + (8 * j + 2 * g + 1) * vs1];
        }
      }
    }
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  });
  return any_bad.load();
}

Status bad_meta_status(const Decompress24Params& p) {
  const int64_t R = p.meta.shape[0], KW = p.meta.shape[1];
  const uint16_t* meta = p.meta.ptr<const uint16_t>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < KW; ++j) {
      const unsigned word = meta[r * p.meta.strides[0] + j * p.meta.strides[1]];
      for (int g = 0; g < 4; ++g) {
        const unsigned i0 = (word >> (4 * g)) & 3u, i1 = (word >> (4 * g + 2)) & 3u;
        if (i0 >= i1)
          return make_status(StatusCode::kInvalidArgument,
                             "[decompress_24] meta[%lld, %lld] = 0x%04x is not valid 2:4 metadata: group %d holds "
                             "indices %u, %u, which must be distinct and ascending",
                             static_cast<long long>(r), static_cast<long long>(j), word, g, i0, i1);
      }
    }
  return Status::Ok();
}

bool is_sparse_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

}  // namespace

Status nm_mask_cpu(const NmMaskParams& p) {
  const TensorArg& s = p.scores;
  if (s.ndim < 1 || !is_sparse_float(s.dtype))
    return make_status(StatusCode::kInvalidArgument, "[nm_mask] scores must be a float32, float16 or bfloat16 tensor with at least 1 dim");
  if (p.m < 2 || p.m > kNmMaxM || p.n <= 0 || p.n >= p.m)
    return make_status(StatusCode::kInvalidArgument, "[nm_mask] need 0 < n < m <= %lld, got n=%lld m=%lld",
                       static_cast<long long>(kNmMaxM), static_cast<long long>(p.n), static_cast<long long>(p.m));
  const int64_t k = s.size(-1);
  if (k % p.m != 0)
    return make_status(StatusCode::kInvalidArgument, "[nm_mask] the last dim of scores (%lld) must be a multiple of m = %lld",
                       static_cast<long long>(k), static_cast<long long>(p.m));
  if (p.out.dtype != DType::Bool || p.out.numel() != s.numel() || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[nm_mask] out must be a contiguous bool tensor shaped like scores");
  if (s.numel() == 0) return Status::Ok();
  switch (s.dtype) {
    case DType::F32: return nm_rows<float>(p) ? nan_status<float>(p) : Status::Ok();
    case DType::F16: return nm_rows<Half>(p) ? nan_status<Half>(p) : Status::Ok();
    default: return nm_rows<BFloat16>(p) ? nan_status<BFloat16>(p) : Status::Ok();
  }
}

Status compress_24_cpu(const Compress24Params& p) {
  const TensorArg& w = p.w;
  if (w.ndim != 2 || !is_sparse_float(w.dtype))
    return make_status(StatusCode::kInvalidArgument, "[compress_24] w must be a 2-D float32, float16 or bfloat16 tensor");
  const int64_t R = w.shape[0], K = w.shape[1];
  if (K % 16 != 0)
    return make_status(StatusCode::kInvalidArgument, "[compress_24] the last dim of w (%lld) must be a multiple of 16",
                       static_cast<long long>(K));
  if (p.values.dtype != w.dtype || p.values.ndim != 2 || p.values.shape[0] != R || p.values.shape[1] != K / 2 ||
      !p.values.is_contiguous() || p.meta.dtype != DType::I16 || p.meta.ndim != 2 || p.meta.shape[0] != R ||
      p.meta.shape[1] != K / 16 || !p.meta.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[compress_24] values must be contiguous [R, K/2] like w and meta contiguous int16 [R, K/16]");
  if (R == 0 || K == 0) return Status::Ok();
  if (w.dtype == DType::F32) return compress_rows<float>(p) ? not24_status<float>(p) : Status::Ok();
  return compress_rows<uint16_t>(p) ? not24_status<uint16_t>(p) : Status::Ok();
}

Status decompress_24_cpu(const Decompress24Params& p) {
  const TensorArg& v = p.values;
  if (v.ndim != 2 || !is_sparse_float(v.dtype) || p.meta.ndim != 2 || p.meta.dtype != DType::I16)
    return make_status(StatusCode::kInvalidArgument, "[decompress_24] values must be 2-D float32/float16/bfloat16 and meta 2-D int16");
  const int64_t R = p.meta.shape[0], KW = p.meta.shape[1];
  if (v.shape[0] != R || v.shape[1] != 8 * KW)
    return make_status(StatusCode::kInvalidArgument, "[decompress_24] values [R, K/2] and meta [R, K/16] do not match");
  if (p.out.dtype != v.dtype || p.out.ndim != 2 || p.out.shape[0] != R || p.out.shape[1] != 16 * KW || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[decompress_24] out must be contiguous [R, K] like values");
  if (R == 0 || KW == 0) return Status::Ok();
  const bool bad = v.dtype == DType::F32 ? decompress_rows<float>(p) : decompress_rows<uint16_t>(p);
  return bad ? bad_meta_status(p) : Status::Ok();
}

}  // namespace calibra
