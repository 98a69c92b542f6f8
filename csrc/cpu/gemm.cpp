// calibra::w4a16_repack, calibra::sparse24_reorder_meta (load-time layout helpers) and plain CPU versions
// of calibra::w4a16_gemm / calibra::sparse24_gemm. The layouts are specified in params/gemm.h; the
// index maps, per output word, are in params/gemm_layout.h (shared with the CUDA kernels).
#include <cstring>
#include <vector>

#include "calibra/elementwise.h"
#include "calibra/parallel.h"
#include "calibra/params/gemm.h"
#include "calibra/params/gemm_layout.h"

namespace calibra {
namespace {

bool is_act(DType t) { return t == DType::F16 || t == DType::BF16; }

}  // namespace

Status w4a16_repack_cpu(const W4A16RepackParams& p) {
  int64_t N = 0, K = 0;
  CALIBRA_RETURN_IF_ERROR(gemm_layout::check_w4a16_repack(p, N, K));
  const auto* q = p.qweight.ptr<const uint32_t>();
  const int64_t qs0 = p.qweight.strides[0], qs1 = p.qweight.strides[1];
  auto* out = p.out.ptr<uint32_t>();
  parallel_for(K / 16, 1, [&](int64_t kt0, int64_t kt1) {
    for (int64_t kt = kt0; kt < kt1; ++kt)
      for (int64_t w = 0; w < 2 * N; ++w) out[kt * 2 * N + w] = gemm_layout::w4a16_repacked_word(q, qs0, qs1, kt, w);
  });
  return Status::Ok();
}

Status sparse24_reorder_meta_cpu(const Sparse24ReorderMetaParams& p) {
  int64_t N = 0, KW = 0;
  CALIBRA_RETURN_IF_ERROR(gemm_layout::check_sparse24_reorder_meta(p, N, KW));
  const auto* m = p.meta.ptr<const uint16_t>();
  const int64_t ms0 = p.meta.strides[0], ms1 = p.meta.strides[1];
  auto* out = p.out.ptr<uint32_t>();
  parallel_for(N / 16, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t rt = r0; rt < r1; ++rt)
      for (int64_t col = 0; col < 8 * KW; ++col) out[rt * 8 * KW + col] = gemm_layout::sparse24_reordered_word(m, ms0, ms1, rt, col);
  });
  return Status::Ok();
}

namespace {

// ---- CPU GEMMs ----------------------------------------------------------------------------------

// y[:, n] for n in [n0, n1): `row(n, w)` fills w[0..K) with W[n, :] (already rounded to T, as float).
template <class T, class RowFn>
void gemm_rows(const T* x, int64_t M, int64_t K, int64_t N, T* y, RowFn row) {
  parallel_for(N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(static_cast<size_t>(K)), xr(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      row(n, w.data());
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < K; ++k) xr[k] = to_float(x[m * K + k]);
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: lets the compiler vectorize
        for (int64_t k = 0; k < K; k += 8)
          for (int u = 0; u < 8; ++u) acc[u] += xr[k + u] * w[k + u];
        float s = 0;
        for (float v : acc) s += v;
        y[m * N + n] = from_float<T>(s);
      }
    }
  });
}

template <class T>
void w4a16_cpu_typed(const W4A16GemmParams& p, int64_t M, int64_t K, int64_t N, int64_t group) {
  const auto* tiled = p.tiled.ptr<const uint32_t>();
  const T* scales = p.scales.ptr<const T>();
  const T* zeros = p.zeros.data ? p.zeros.ptr<const T>() : nullptr;
  gemm_rows<T>(p.x.ptr<const T>(), M, K, N, p.out.ptr<T>(), [&](int64_t n, float* w) {
    // Inverse of the tile map: code (n, k) is nibble i = a + 4c of word [kt, 128b + 4*lane + j].
    const int64_t b = n / 64, j = (n % 64) / 16, nn = n % 16;
    const int64_t g = nn % 8, ahi = nn / 8;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t kt = k / 16, kk = k % 16;
      const int64_t alo = kk / 8, t = (kk % 8) / 2, c = kk % 2;
      const int64_t lane = 4 * g + t, a = alo + 2 * ahi, i = a + 4 * c;
      const uint32_t word = tiled[kt * 2 * N + 128 * b + 4 * lane + j];
      const float code = static_cast<float>((word >> (4 * i)) & 0xFu);
      const int64_t gi = k / group;
      const float z = zeros ? to_float(zeros[gi * N + n]) : 8.0f;
      w[k] = to_float(from_float<T>((code - z) * to_float(scales[gi * N + n])));
    }
  });
}

template <class T>
void sparse24_cpu_typed(const Sparse24GemmParams& p, int64_t M, int64_t K, int64_t N) {
  const T* vals = p.values.ptr<const T>();
  const auto* meta = p.meta.ptr<const uint32_t>();
  gemm_rows<T>(p.x.ptr<const T>(), M, K, N, p.out.ptr<T>(), [&](int64_t n, float* w) {
    std::memset(w, 0, sizeof(float) * static_cast<size_t>(K));
    const int64_t rt = n / 16, g = n % 8, s = (n % 16) / 8;
    for (int64_t c = 0; c < K / 16; ++c) {  // c = 16-column metadata word of row n
      const uint32_t word = (meta[rt * (K / 2) + 16 * (c / 2) + 2 * g + (c % 2)] >> (16 * s)) & 0xFFFFu;
      for (int q = 0; q < 4; ++q) {
        const uint32_t i0 = (word >> (4 * q)) & 3u, i1 = (word >> (4 * q + 2)) & 3u;
        w[16 * c + 4 * q + i0] += to_float(vals[n * (K / 2) + 8 * c + 2 * q]);
        w[16 * c + 4 * q + i1] += to_float(vals[n * (K / 2) + 8 * c + 2 * q + 1]);
      }
    }
  });
}

Status check_out(const char* op, const TensorArg& x, const TensorArg& out, int64_t M, int64_t N) {
  if (out.dtype != x.dtype || out.ndim < 1 || out.numel() != M * N || out.size(-1) != N || !out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[%s] out must be contiguous [M, N] in x's dtype", op);
  return Status::Ok();
}

}  // namespace

Status w4a16_gemm_cpu(const W4A16GemmParams& p) {
  const TensorArg& x = p.x;
  if (!is_act(x.dtype) || !x.is_contiguous() || x.ndim < 1)
    return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] x must be contiguous float16 or bfloat16");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  const int64_t N = p.tiled.ndim == 2 ? p.tiled.shape[1] / 2 : 0;
  const int64_t group = p.group == -1 ? K : p.group;
  if (p.tiled.dtype != DType::I32 || p.tiled.ndim != 2 || p.tiled.shape[0] * 16 != K || N % 64 != 0 ||
      !p.tiled.is_contiguous() || group <= 0 || K % group != 0)
    return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] tiled must be contiguous int32 [K/16, 2N], N %% 64 == 0, group | K");
  const int64_t G = K / group;
  if (p.scales.dtype != x.dtype || p.scales.numel() != G * N || !p.scales.is_contiguous() ||
      (p.zeros.data && (p.zeros.dtype != x.dtype || p.zeros.numel() != G * N || !p.zeros.is_contiguous())))
    return make_status(StatusCode::kInvalidArgument, "[w4a16_gemm] scales/zeros must be contiguous [G, N] in x's dtype");
  CALIBRA_RETURN_IF_ERROR(check_out("w4a16_gemm", x, p.out, M, N));
  if (M == 0 || N == 0) return Status::Ok();
  if (K == 0) {
    std::memset(p.out.data, 0, static_cast<size_t>(M * N) * 2);
    return Status::Ok();
  }
  if (x.dtype == DType::F16) w4a16_cpu_typed<Half>(p, M, K, N, group);
  else w4a16_cpu_typed<BFloat16>(p, M, K, N, group);
  return Status::Ok();
}

Status sparse24_gemm_cpu(const Sparse24GemmParams& p) {
  const TensorArg& x = p.x;
  if (!is_act(x.dtype) || !x.is_contiguous() || x.ndim < 1)
    return make_status(StatusCode::kInvalidArgument, "[sparse24_gemm] x must be contiguous float16 or bfloat16");
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  const int64_t N = p.values.ndim == 2 ? p.values.shape[0] : 0;
  if (p.values.dtype != x.dtype || p.values.ndim != 2 || p.values.shape[1] * 2 != K || N % 16 != 0 || K % 32 != 0 ||
      !p.values.is_contiguous() || p.meta.dtype != DType::I32 || p.meta.ndim != 2 || p.meta.shape[0] != N / 16 ||
      p.meta.shape[1] != K / 2 || !p.meta.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[sparse24_gemm] values must be contiguous [N, K/2] like x, meta contiguous int32 [N/16, K/2]");
  CALIBRA_RETURN_IF_ERROR(check_out("sparse24_gemm", x, p.out, M, N));
  if (M == 0 || N == 0) return Status::Ok();
  if (x.dtype == DType::F16) sparse24_cpu_typed<Half>(p, M, K, N);
  else sparse24_cpu_typed<BFloat16>(p, M, K, N);
  return Status::Ok();
}

}  // namespace calibra
