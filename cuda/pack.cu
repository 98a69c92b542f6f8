// calibra::pack / calibra::unpack on CUDA. One thread per output element (output is contiguous, so
// writes coalesce): pack gathers the <= 33 codes that touch its word; unpack reads the one or two
// words that hold its code. A code >= 2^bits lowers the err flag to its row-major index (atomic
// min), so the first offender is reported whatever the thread order; nothing is allocated here.
#include "calibra/params/pack.h"
#include "common.cuh"

namespace calibra {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops beyond this

__global__ void pack_kernel(const uint8_t* __restrict__ codes, int64_t s0, int64_t s1, int64_t C, int64_t n,
                            int64_t L, bool d1, int b, int wb, int64_t nw, uint8_t* __restrict__ out,
                            unsigned long long* __restrict__ err) {
  const int64_t total = L * nw;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // out is [L, nw] (dim 1) or [nw, L] (dim 0), contiguous
    const int64_t l = d1 ? idx / nw : idx % L;
    const int64_t k = d1 ? idx % nw : idx / L;
    const int64_t first_bit = k * wb;
    const int64_t i0 = first_bit / b;
    const int64_t i1 = min(n, (first_bit + wb + b - 1) / b);
    uint64_t acc = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = d1 ? l : i, c = d1 ? i : l;
      const unsigned v = codes[r * s0 + c * s1];
      if (v >> b) atomicMin(err, static_cast<unsigned long long>(r * C + c));
      const int64_t off = i * b - first_bit;  // may be negative for a code straddling into this word
      acc |= off >= 0 ? static_cast<uint64_t>(v) << off : static_cast<uint64_t>(v) >> (-off);
    }
    if (wb == 32) reinterpret_cast<uint32_t*>(out)[idx] = static_cast<uint32_t>(acc);
    else out[idx] = static_cast<uint8_t>(acc);
  }
}

__global__ void unpack_kernel(const uint8_t* __restrict__ words, int64_t wls, int64_t wks, int64_t n, int64_t L,
                              bool d1, int b, int wb, int64_t nw, uint8_t* __restrict__ out) {
  const int64_t total = L * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // out is [L, n] (dim 1) or [n, L] (dim 0), contiguous
    const int64_t l = d1 ? idx / n : idx % L;
    const int64_t i = d1 ? idx % n : idx / L;
    const int64_t bit = i * b;
    const int64_t k = bit / wb;
    const int sh = static_cast<int>(bit % wb);
    auto word = [&](int64_t kk) -> uint64_t {
      const int64_t off = l * wls + kk * wks;
      return wb == 32 ? reinterpret_cast<const uint32_t*>(words)[off] : words[off];
    };
    uint64_t v = word(k) >> sh;
    if (sh + b > wb && k + 1 < nw) v |= word(k + 1) << (wb - sh);
    out[idx] = static_cast<uint8_t>(v & ((1u << b) - 1u));
  }
}

unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxBlocks, cuda::ceil_div(total, kThreads))));
}

}  // namespace

Status pack_cuda(const PackParams& p, cudaStream_t stream) {
  const TensorArg& c = p.codes;
  if (c.ndim != 2 || c.dtype != DType::U8)
    return make_status(StatusCode::kInvalidArgument, "[pack] codes must be a 2-D uint8 tensor");
  if (p.bits < 1 || p.bits > 8 || (p.dim != 0 && p.dim != 1))
    return make_status(StatusCode::kInvalidArgument, "[pack] bits must be in [1, 8] and dim 0 or 1");
  if ((p.out.dtype != DType::I32 && p.out.dtype != DType::U8) || p.out.ndim != 2 || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[pack] out must be a contiguous 2-D int32 or uint8 tensor");
  if (p.err.dtype != DType::I64 || p.err.numel() < 1)
    return make_status(StatusCode::kInvalidArgument, "[pack] err must be an int64 tensor with one element");
  const int b = static_cast<int>(p.bits);
  const bool d1 = p.dim == 1;
  const int64_t R = c.shape[0], C = c.shape[1];
  const int64_t n = d1 ? C : R, L = d1 ? R : C;
  const int wb = p.out.dtype == DType::I32 ? 32 : 8;
  const int64_t nw = (n * b + wb - 1) / wb;
  if (p.out.shape[0] != (d1 ? R : nw) || p.out.shape[1] != (d1 ? nw : C))
    return make_status(StatusCode::kInvalidArgument, "[pack] out has the wrong shape");
  const int64_t total = L * nw;
  if (total == 0) return Status::Ok();
  pack_kernel<<<grid_for(total), kThreads, 0, stream>>>(c.ptr<const uint8_t>(), c.strides[0], c.strides[1], C, n, L, d1, b,
                                                         wb, nw, p.out.ptr<uint8_t>(), p.err.ptr<unsigned long long>());
  return cuda::launch_status("pack");
}

Status unpack_cuda(const UnpackParams& p, cudaStream_t stream) {
  const TensorArg& w = p.words;
  if (w.ndim != 2 || (w.dtype != DType::I32 && w.dtype != DType::U8))
    return make_status(StatusCode::kInvalidArgument, "[unpack] words must be a 2-D int32 or uint8 tensor");
  if (p.bits < 1 || p.bits > 8 || (p.dim != 0 && p.dim != 1) || p.length < 0)
    return make_status(StatusCode::kInvalidArgument, "[unpack] bits must be in [1, 8], dim 0 or 1, length >= 0");
  if (p.out.dtype != DType::U8 || p.out.ndim != 2 || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[unpack] out must be a contiguous 2-D uint8 tensor");
  const int b = static_cast<int>(p.bits);
  const bool d1 = p.dim == 1;
  const int64_t n = p.length;
  const int64_t L = d1 ? w.shape[0] : w.shape[1];
  const int wb = w.dtype == DType::I32 ? 32 : 8;
  const int64_t nw = (n * b + wb - 1) / wb;
  if ((d1 ? w.shape[1] : w.shape[0]) != nw)
    return make_status(StatusCode::kInvalidArgument, "[unpack] the word count does not match length");
  if (p.out.shape[0] != (d1 ? L : n) || p.out.shape[1] != (d1 ? n : L))
    return make_status(StatusCode::kInvalidArgument, "[unpack] out has the wrong shape");
  const int64_t total = L * n;
  if (total == 0) return Status::Ok();
  const int64_t wls = d1 ? w.strides[0] : w.strides[1], wks = d1 ? w.strides[1] : w.strides[0];
  unpack_kernel<<<grid_for(total), kThreads, 0, stream>>>(w.ptr<const uint8_t>(), wls, wks, n, L, d1, b, wb, nw,
                                                           p.out.ptr<uint8_t>());
  return cuda::launch_status("unpack");
}

}  // namespace calibra
