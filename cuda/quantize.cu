// calibra quantize family on CUDA. Same arithmetic as the CPU kernels and the reference (true IEEE
// divisions via __fdiv_rn, rintf = round half to even, --fmad=false), so codes, zeros and scales are
// meant to be bit-identical.
//
// quantize_int: one 128-thread block per (row, group): a block reduction of min/max, then the block
//   quantizes the group (the second read hits L1/L2).
// quantize_fp4: one thread per element; the 16 or 32 lanes of a group reduce their amax with warp
//   shuffles. NVFP4 first reduces the tensor's amax into global_scale (as fp32 bits, atomicMax), then a
//   one-thread kernel turns it into 448*6/amax in place; no scratch allocation.
// Non-finite input: kernels atomicMin the first bad row-major index into p.err, the registry's
//   data-error flag (int64 [1], pre-set to INT64_MAX by the caller; see @cuda_data_error in
//   python/calibra/ops/_registry.py), which the Python adapter reads back and raises.
#include <cstdint>
#include <type_traits>

#include "calibra/fp4.h"
#include "calibra/params/quantize.h"
#include "calibra/params/quantize_checks.h"
#include "common.cuh"

namespace calibra {
namespace {

constexpr int kIntThreads = 128;
constexpr int kElemThreads = 256;


struct Mat {  // a 2-D strided matrix
  int64_t rows, cols, s0, s1;
  __host__ static Mat of(const TensorArg& t) { return Mat{t.shape[0], t.shape[1], t.strides[0], t.strides[1]}; }
};

template <class T>
__device__ __forceinline__ float ld(const T* p, const Mat& m, int64_t r, int64_t c) {
  return cuda::load_f32<T>(p + r * m.s0 + c * m.s1);
}

__device__ __forceinline__ bool finite_f(float v) { return isfinite(v); }

template <class T>
__device__ __forceinline__ float round_scale(float s);
template <> __device__ __forceinline__ float round_scale<float>(float s) { return s; }
template <> __device__ __forceinline__ float round_scale<__half>(float s) { return __half2float(__float2half_rn(s)); }
template <> __device__ __forceinline__ float round_scale<__nv_bfloat16>(float s) {
  return __bfloat162float(__float2bfloat16_rn(s));
}

template <class T>
__global__ void __launch_bounds__(kIntThreads) quantize_int_kernel(const T* __restrict__ w, Mat wm, uint8_t* __restrict__ codes,
                                                                   T* __restrict__ scales, uint8_t* __restrict__ zeros,
                                                                   int64_t gs, int64_t groups, float maxq, int symmetric,
                                                                   unsigned long long* bad) {
  __shared__ float smin[kIntThreads / 32], smax[kIntThreads / 32];
  __shared__ float sparams[2];
  const int64_t r = blockIdx.x / groups;
  const int64_t g = blockIdx.x % groups;
  const int64_t c0 = g * gs;
  float mn = 0.0f, mx = 0.0f;
  for (int64_t j = threadIdx.x; j < gs; j += blockDim.x) {
    const float v = ld(w, wm, r, c0 + j);
    if (!finite_f(v)) atomicMin(bad, static_cast<unsigned long long>(r * wm.cols + c0 + j));
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  for (int o = 16; o > 0; o >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { smin[warp] = mn; smax[warp] = mx; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 1; k < kIntThreads / 32; ++k) { mn = fminf(mn, smin[k]); mx = fmaxf(mx, smax[k]); }
    float s, z;
    if (symmetric) {
      const float amax = fmaxf(-mn, mx);
      s = round_scale<T>(__fdiv_rn(2.0f * amax, maxq));
      if (s == 0.0f) s = 1.0f;
      z = __fdiv_rn(maxq + 1.0f, 2.0f);
    } else {
      s = round_scale<T>(__fdiv_rn(mx - mn, maxq));
      if (s == 0.0f) s = 1.0f;
      z = fminf(fmaxf(rintf(__fdiv_rn(-mn, s)), 0.0f), maxq);
    }
    scales[r * groups + g] = cuda::store_f32<T>(s);
    zeros[r * groups + g] = static_cast<uint8_t>(z);
    sparams[0] = s;
    sparams[1] = z;
  }
  __syncthreads();
  const float s = sparams[0], z = sparams[1];
  uint8_t* crow = codes + r * wm.cols + c0;
  for (int64_t j = threadIdx.x; j < gs; j += blockDim.x) {
    float q = __fdiv_rn(ld(w, wm, r, c0 + j), s);
    q = fminf(fmaxf(q, -4194304.0f), 4194304.0f);  // NaN -> -2^22 (the call fails anyway)
    q = fminf(fmaxf(__fadd_rn(rintf(q), z), 0.0f), maxq);
    crow[j] = static_cast<uint8_t>(q);
  }
}

template <class TS, class T>
__global__ void dequantize_int_kernel(const uint8_t* __restrict__ codes, Mat cm, const TS* __restrict__ scales, Mat sm,
                                      const uint8_t* __restrict__ zeros, Mat zm, T* __restrict__ out, int64_t gs) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= cm.rows * cm.cols) return;
  const int64_t r = e / cm.cols, c = e % cm.cols, g = c / gs;
  const float q = static_cast<float>(codes[r * cm.s0 + c * cm.s1]);
  const float z = static_cast<float>(zeros[r * zm.s0 + g * zm.s1]);
  const float s = cuda::load_f32<TS>(scales + r * sm.s0 + g * sm.s1);
  out[e] = cuda::store_f32<T>(__fmul_rn(__fsub_rn(q, z), s));
}

// NVFP4 pass 1: max |w| over the tensor as fp32 bits into *amax_bits (pre-zeroed).
template <class T>
__global__ void amax_kernel(const T* __restrict__ w, Mat wm, unsigned int* amax_bits, unsigned long long* bad) {
  __shared__ unsigned int sm[kElemThreads / 32];
  const int64_t total = wm.rows * wm.cols;
  unsigned int m = 0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / wm.cols, c = e % wm.cols;
    const float v = ld(w, wm, r, c);
    if (!finite_f(v)) atomicMin(bad, static_cast<unsigned long long>(e));
    else m = max(m, __float_as_uint(fabsf(v)));
  }
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) sm[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 1; k < kElemThreads / 32; ++k) m = max(m, sm[k]);
    atomicMax(amax_bits, m);
  }
}

__global__ void finalize_global_scale_kernel(float* gs) {
  const float amax = *gs;  // holds the amax bits
  *gs = amax == 0.0f ? 1.0f : __fdiv_rn(2688.0f, amax);
}

__global__ void fill_kernel(float* p, float v) { *p = v; }

template <class T, int GS>
__global__ void __launch_bounds__(kElemThreads) quantize_fp4_kernel(const T* __restrict__ w, Mat wm, uint8_t* __restrict__ codes,
                                                                    uint8_t* __restrict__ scales, const float* gscale_ptr,
                                                                    unsigned long long* bad) {
  const int64_t total = wm.rows * wm.cols;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool in = e < total;
  const int64_t r = in ? e / wm.cols : 0, c = in ? e % wm.cols : 0;
  const float v = in ? ld(w, wm, r, c) : 0.0f;
  if (in && !finite_f(v)) atomicMin(bad, static_cast<unsigned long long>(e));
  float amax = fabsf(v);
  for (int o = GS / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (!in) return;
  const int64_t group = e / GS;  // == r * (cols / GS) + c / GS because GS divides cols
  float d;
  uint8_t sb;
  if (GS == 32) {
    if (amax == 0.0f) {
      sb = 0;
      d = 0.0f;
    } else {
      const int ex = fp4::mx_exponent(amax);
      sb = static_cast<uint8_t>(ex + 127);
      d = fp4::exp2_int(ex);
    }
  } else {
    const float gs = *gscale_ptr;
    sb = fp4::e4m3_from_float(__fmul_rn(__fdiv_rn(amax, 6.0f), gs));
    d = __fdiv_rn(fp4::e4m3_to_float(sb), gs);
  }
  if (c % GS == 0) scales[group] = sb;
  codes[e] = d == 0.0f ? 0 : fp4::e2m1_encode(__fdiv_rn(v, d));
}

template <class T>
__global__ void dequantize_fp4_kernel(const uint8_t* __restrict__ codes, Mat cm, const uint8_t* __restrict__ scales, Mat sm,
                                      const float* gscale_ptr, T* __restrict__ out, int gs, int mx) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= cm.rows * cm.cols) return;
  const int64_t r = e / cm.cols, c = e % cm.cols, g = c / gs;
  const uint8_t sb = scales[r * sm.s0 + g * sm.s1];
  float d;
  if (mx) d = sb == 255 ? __uint_as_float(0x7fc00000u) : fp4::exp2_int(static_cast<int>(sb) - 127);
  else d = __fdiv_rn(fp4::e4m3_to_float(sb), *gscale_ptr);
  out[e] = cuda::store_f32<T>(__fmul_rn(fp4::e2m1_decode(codes[r * cm.s0 + c * cm.s1]), d));
}

// Calls f(T{}) for float / __half / __nv_bfloat16.
template <class F>
bool dispatch_w(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(float{}); return true;
    case DType::F16: f(__half{}); return true;
    case DType::BF16: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}


unsigned long long* bad_flag(const TensorArg& err) { return static_cast<unsigned long long*>(err.data); }

bool valid_flag(const TensorArg& err) { return err.data != nullptr && err.ndim == 1 && err.shape[0] == 1 && err.dtype == DType::I64; }

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>(cuda::ceil_div(n, threads)); }

}  // namespace

Status quantize_int_cuda(const QuantizeIntParams& p, cudaStream_t stream) {
  quantize_checks::IntShape sh;
  CALIBRA_RETURN_IF_ERROR(quantize_checks::check_quantize_int(p, sh));
  const int64_t out = sh.out, groups = sh.groups, gs = sh.gs;
  if (out == 0) return Status::Ok();
  if (out * groups > 0x7fffffffLL)
    return make_status(StatusCode::kUnsupported, "[quantize] too many groups for one CUDA launch");
  if (!valid_flag(p.err)) return make_status(StatusCode::kInvalidArgument, "[quantize] err must be an int64 [1] flag");
  const Mat wm = Mat::of(p.w);
  const float maxq = static_cast<float>((1 << p.bits) - 1);
  dispatch_w(p.w.dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_int_kernel<T><<<static_cast<unsigned>(out * groups), kIntThreads, 0, stream>>>(
        p.w.ptr<const T>(), wm, p.codes.ptr<uint8_t>(), p.scales.ptr<T>(), p.zeros.ptr<uint8_t>(), gs, groups, maxq,
        p.symmetric ? 1 : 0, bad_flag(p.err));
  });
  return cuda::launch_status("quantize");
}

Status dequantize_int_cuda(const DequantizeIntParams& p, cudaStream_t stream) {
  quantize_checks::IntShape sh;
  CALIBRA_RETURN_IF_ERROR(quantize_checks::check_dequantize_int(p, sh));
  const int64_t out = sh.out, n = sh.n, gs = sh.gs;
  if (out == 0 || n == 0) return Status::Ok();
  dispatch_w(p.out.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_w(p.scales.dtype, [&](auto stag) {
      using TS = decltype(stag);
      dequantize_int_kernel<TS, T><<<blocks_for(out * n, kElemThreads), kElemThreads, 0, stream>>>(
          p.codes.ptr<const uint8_t>(), Mat::of(p.codes), p.scales.ptr<const TS>(), Mat::of(p.scales),
          p.zeros.ptr<const uint8_t>(), Mat::of(p.zeros), p.out.ptr<T>(), gs);
    });
  });
  return cuda::launch_status("dequantize");
}

Status quantize_fp4_cuda(const QuantizeFp4Params& p, cudaStream_t stream) {
  quantize_checks::Fp4Shape sh;
  CALIBRA_RETURN_IF_ERROR(quantize_checks::check_quantize_fp4(p, sh));
  const bool mx = sh.mx;
  const int64_t out = sh.out, n = sh.n;
  const int64_t total = out * n;
  if (cuda::ceil_div(total, kElemThreads) > 0x7fffffffLL)
    return make_status(StatusCode::kUnsupported, "[quantize] tensor too large for one CUDA launch");
  if (!valid_flag(p.err)) return make_status(StatusCode::kInvalidArgument, "[quantize] err must be an int64 [1] flag");
  float* gsp = p.global_scale.ptr<float>();
  const Mat wm = Mat::of(p.w);
  dispatch_w(p.w.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (mx) {
      fill_kernel<<<1, 1, 0, stream>>>(gsp, 1.0f);
      if (total > 0)
        quantize_fp4_kernel<T, 32><<<blocks_for(total, kElemThreads), kElemThreads, 0, stream>>>(
            p.w.ptr<const T>(), wm, p.codes.ptr<uint8_t>(), p.scales.ptr<uint8_t>(), gsp, bad_flag(p.err));
    } else {
      cudaMemsetAsync(gsp, 0, sizeof(float), stream);
      if (total > 0) {
        const unsigned grid = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(total, kElemThreads), 4096));
        amax_kernel<T><<<grid, kElemThreads, 0, stream>>>(p.w.ptr<const T>(), wm, reinterpret_cast<unsigned int*>(gsp), bad_flag(p.err));
      }
      finalize_global_scale_kernel<<<1, 1, 0, stream>>>(gsp);
      if (total > 0)
        quantize_fp4_kernel<T, 16><<<blocks_for(total, kElemThreads), kElemThreads, 0, stream>>>(
            p.w.ptr<const T>(), wm, p.codes.ptr<uint8_t>(), p.scales.ptr<uint8_t>(), gsp, bad_flag(p.err));
    }
  });
  return cuda::launch_status("quantize");
}

Status dequantize_fp4_cuda(const DequantizeFp4Params& p, cudaStream_t stream) {
  quantize_checks::Fp4Shape sh;
  CALIBRA_RETURN_IF_ERROR(quantize_checks::check_dequantize_fp4(p, sh));
  const bool mx = sh.mx;
  const int64_t out = sh.out, n = sh.n;
  if (out == 0 || n == 0) return Status::Ok();
  dispatch_w(p.out.dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_fp4_kernel<T><<<blocks_for(out * n, kElemThreads), kElemThreads, 0, stream>>>(
        p.codes.ptr<const uint8_t>(), Mat::of(p.codes), p.scales.ptr<const uint8_t>(), Mat::of(p.scales),
        p.global_scale.ptr<const float>(), p.out.ptr<T>(), static_cast<int>(sh.gs), mx ? 1 : 0);
  });
  return cuda::launch_status("dequantize");
}

}  // namespace calibra
