// calibra quantize family on CPU. Rows are spread over the thread pool; within a row each group is
// scanned once for min/max (and non-finite values) and then quantized, all in fp32 with GCC vector
// extensions (16 lanes). The row kernels are compiled three times -- AVX-512, AVX2 and baseline
// x86-64 -- and picked at run time with __builtin_cpu_supports, so the wheel runs on any x86-64.
// Every operation matches calibra.ops._ref.quantize bit for bit: true divisions (no reciprocal
// multiply), round-half-even through the exact magic-number trick (x + 1.5*2^23) - 1.5*2^23 on
// |x| <= 2^22, and no FMA contraction (-ffp-contract=off).
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "calibra/elementwise.h"
#include "calibra/fp4.h"
#include "calibra/half.h"
#include "calibra/parallel.h"
#include "calibra/params/quantize.h"
#include "calibra/params/quantize_checks.h"
#include "calibra/quant_math.h"

#define CALIBRA_AI __attribute__((always_inline)) inline

// The 64-byte vector helpers are always inlined, so the vector-argument ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace calibra {
namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));
constexpr int64_t kLanes = 16;
constexpr float kMagic = qmath::kMagic;
constexpr float kClampRound = qmath::kClampRound;

CALIBRA_AI v16f load16(const float* p) { v16f v; std::memcpy(&v, p, sizeof(v)); return v; }
CALIBRA_AI v16f splat(float f) { return v16f{} + f; }
CALIBRA_AI void store_codes(uint8_t* dst, v16f q) {
  const v16i qi = __builtin_convertvector(q, v16i);
  const v16b b = __builtin_convertvector(qi, v16b);
  std::memcpy(dst, &b, sizeof(b));
}

// ---------------------------------------------------------------------------------------------
// row access

// Pointer to row r of w as contiguous fp32: w itself when it is fp32 with unit column stride,
// else the row converted into buf.
template <class T>
CALIBRA_AI const float* row_f32(const TensorArg& w, int64_t r, float* buf) {
  const int64_t n = w.shape[1];
  const int64_t cs = w.strides[1];
  const T* src = w.ptr<const T>() + r * w.strides[0];
  if constexpr (std::is_same_v<T, float>) {
    if (cs == 1) return src;
    for (int64_t j = 0; j < n; ++j) buf[j] = src[j * cs];
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = to_float(src[j * cs]);
  }
  return buf;
}

typedef int32_t v16m __attribute__((vector_size(64)));
constexpr v16m kSwap8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
constexpr v16m kSwap4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
constexpr v16m kSwap2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
constexpr v16m kSwap1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};

// Horizontal min / max / or: every lane ends up holding the result.
CALIBRA_AI v16f hmin(v16f v) {
  v16f t;
  t = __builtin_shuffle(v, kSwap8); v = t < v ? t : v;
  t = __builtin_shuffle(v, kSwap4); v = t < v ? t : v;
  t = __builtin_shuffle(v, kSwap2); v = t < v ? t : v;
  t = __builtin_shuffle(v, kSwap1); v = t < v ? t : v;
  return v;
}
CALIBRA_AI v16f hmax(v16f v) {
  v16f t;
  t = __builtin_shuffle(v, kSwap8); v = t > v ? t : v;
  t = __builtin_shuffle(v, kSwap4); v = t > v ? t : v;
  t = __builtin_shuffle(v, kSwap2); v = t > v ? t : v;
  t = __builtin_shuffle(v, kSwap1); v = t > v ? t : v;
  return v;
}
CALIBRA_AI v16i hor(v16i v) {
  v |= __builtin_shuffle(v, kSwap8);
  v |= __builtin_shuffle(v, kSwap4);
  v |= __builtin_shuffle(v, kSwap2);
  v |= __builtin_shuffle(v, kSwap1);
  return v;
}

// min(x, 0), max(x, 0) over n values; false when one is NaN/Inf.
CALIBRA_AI bool scan_minmax(const float* x, int64_t n, float* mn_out, float* mx_out) {
  v16f vmin{}, vmax{};
  v16i bad{};
  const v16f zf{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const v16f v = load16(x + i);
    vmin = v < vmin ? v : vmin;
    vmax = v > vmax ? v : vmax;
    bad |= ((v - v) != zf);  // Inf - Inf and NaN - NaN are NaN, which compares unequal
  }
  // tree reductions across the 16 lanes (shuffles, no per-lane extraction)
  vmin = hmin(vmin);
  vmax = hmax(vmax);
  bad = hor(bad);
  float mn = vmin[0], mx = vmax[0];
  int b = bad[0];
  for (; i < n; ++i) {
    const float v = x[i];
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    b |= ((v - v) != 0.0f);
  }
  *mn_out = mn;
  *mx_out = mx;
  return b == 0;
}

// codes = clamp(rne(x / s) + zero, 0, maxq)
CALIBRA_AI void quant_group(const float* x, int64_t n, float s, float zero, float maxq, uint8_t* out) {
  const v16f vs = splat(s), vz = splat(zero), vq = splat(maxq), lo = splat(-kClampRound), hi = splat(kClampRound),
             zf = splat(0.0f), mg = splat(kMagic);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    v16f q = load16(x + i) / vs;
    q = q < lo ? lo : q;
    q = q > hi ? hi : q;
    q = ((q + mg) - mg) + vz;
    q = q < zf ? zf : q;
    q = q > vq ? vq : q;
    store_codes(out + i, q);
  }
  for (; i < n; ++i) out[i] = static_cast<uint8_t>(qmath::int_code(x[i], s, zero, maxq));
}

// E2M1 codes of x / d (ties to the even code; zero -> code 0)
CALIBRA_AI void fp4_group(const float* x, int64_t n, float d, uint8_t* out) {
  // Compare against vector constants only: GCC scalarizes vector-vs-scalar comparisons in some
  // contexts (seen with GCC 12), which made this loop 10x slower.
  const v16f vd = splat(d), t0 = splat(0.25f), t1 = splat(0.75f), t2 = splat(1.25f),
             t3 = splat(1.75f), t4 = splat(2.5f), t5 = splat(3.5f), t6 = splat(5.0f);
  const v16i absmask = v16i{} + 0x7fffffff, zi = v16i{}, eight = v16i{} + 8;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const v16f v = load16(x + i) / vd;
    const v16f a = reinterpret_cast<v16f>(reinterpret_cast<v16i>(v) & absmask);
    const v16i idx = zi - ((a > t0) + (a >= t1) + (a > t2) + (a >= t3) + (a > t4) + (a >= t5) + (a > t6));
    // sign from the sign bit (x < 0 for every nonzero value; -0 has idx 0 and stays code 0)
    const v16i sgn = (reinterpret_cast<v16i>(v) >> 31) & eight;
    const v16i code = idx | (sgn & (idx != zi));
    const v16b b = __builtin_convertvector(code, v16b);
    std::memcpy(out + i, &b, sizeof(b));
  }
  for (; i < n; ++i) out[i] = fp4::e2m1_encode(x[i] / d);
}

// Column of the first non-finite value in a row of n values.
CALIBRA_AI int64_t first_bad_col(const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (!std::isfinite(x[j])) return j;
  return 0;
}

void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
}

void atomic_max_u32(std::atomic<uint32_t>& a, uint32_t v) {
  uint32_t cur = a.load();
  while (v > cur && !a.compare_exchange_weak(cur, v)) {
  }
}

// Round s to the scale dtype and store it; return the stored value (a stored 0 becomes 1).
float store_scale(DType dt, void* scales, int64_t idx, float s) {
  const float r = qmath::round_scale(dt, s);
  switch (dt) {
    case DType::F16: static_cast<uint16_t*>(scales)[idx] = float_to_half(r); break;
    case DType::BF16: static_cast<uint16_t*>(scales)[idx] = float_to_bf16(r); break;
    default: static_cast<float*>(scales)[idx] = r; break;
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// row bodies (always inlined into one function per ISA)

struct IntJob {
  const QuantizeIntParams* p;
  int64_t n, gs, groups;
  float maxq;
  std::atomic<int64_t>* first_bad;
};

template <class T>
CALIBRA_AI void quant_int_rows_body(const IntJob& j, int64_t r0, int64_t r1, float* buf) {
  const QuantizeIntParams& p = *j.p;
  uint8_t* codes = p.codes.ptr<uint8_t>();
  uint8_t* zeros = p.zeros.ptr<uint8_t>();
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = row_f32<T>(p.w, r, buf);
    for (int64_t g = 0; g < j.groups; ++g) {
      const float* xg = x + g * j.gs;
      float mn, mx;
      if (!scan_minmax(xg, j.gs, &mn, &mx)) {
        atomic_min(*j.first_bad, r * j.n + first_bad_col(x, j.n));
        return;  // rows ascend within a chunk: this is the chunk's first bad element
      }
      const float s = store_scale(p.scales.dtype, p.scales.data, r * j.groups + g,
                                  qmath::int_raw_scale(mn, mx, j.maxq, p.symmetric));
      const float zero = qmath::int_zero(mn, s, j.maxq, p.symmetric);
      zeros[r * j.groups + g] = static_cast<uint8_t>(zero);
      quant_group(xg, j.gs, s, zero, j.maxq, codes + r * j.n + g * j.gs);
    }
  }
}

struct Fp4Job {
  const QuantizeFp4Params* p;
  int64_t n, gs, groups;
  float gscale;  // nvfp4 global scale
  std::atomic<int64_t>* first_bad;
  std::atomic<uint32_t>* amax_bits;  // nvfp4 pass 1
};

// nvfp4 pass 1: the tensor's max |w| (as fp32 bits; non-negative floats order like their bits).
template <class T>
CALIBRA_AI void amax_rows_body(const Fp4Job& j, int64_t r0, int64_t r1, float* buf) {
  float amax = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = row_f32<T>(j.p->w, r, buf);
    float mn, mx;
    if (!scan_minmax(x, j.n, &mn, &mx)) {
      atomic_min(*j.first_bad, r * j.n + first_bad_col(x, j.n));
      return;
    }
    const float a = -mn > mx ? -mn : mx;
    amax = a > amax ? a : amax;
  }
  atomic_max_u32(*j.amax_bits, fp4::f2u(amax));
}

template <class T>
CALIBRA_AI void quant_fp4_rows_body(const Fp4Job& j, int64_t r0, int64_t r1, float* buf) {
  const QuantizeFp4Params& p = *j.p;
  uint8_t* codes = p.codes.ptr<uint8_t>();
  uint8_t* scales = p.scales.ptr<uint8_t>();
  const bool mx = p.format == Fp4Format::kMxfp4;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = row_f32<T>(p.w, r, buf);
    for (int64_t g = 0; g < j.groups; ++g) {
      const float* xg = x + g * j.gs;
      uint8_t* cg = codes + r * j.n + g * j.gs;
      float mn, mxv;
      if (!scan_minmax(xg, j.gs, &mn, &mxv)) {
        atomic_min(*j.first_bad, r * j.n + first_bad_col(x, j.n));
        return;
      }
      const float amax = -mn > mxv ? -mn : mxv;
      float d;
      if (mx) {
        if (amax == 0.0f) {
          scales[r * j.groups + g] = 0;
          d = 0.0f;
        } else {
          const int e = fp4::mx_exponent(amax);
          scales[r * j.groups + g] = static_cast<uint8_t>(e + 127);
          d = fp4::exp2_int(e);
        }
      } else {
        const uint8_t s = fp4::e4m3_from_float((amax / 6.0f) * j.gscale);
        scales[r * j.groups + g] = s;
        d = fp4::e4m3_to_float(s) / j.gscale;
      }
      if (d == 0.0f) std::memset(cg, 0, static_cast<size_t>(j.gs));
      else fp4_group(xg, j.gs, d, cg);
    }
  }
}

#define CALIBRA_ISA_FUNCS(suffix, attr)                                                          \
  template <class T>                                                                            \
  attr void quant_int_rows_##suffix(const IntJob& j, int64_t r0, int64_t r1, float* buf) {      \
    quant_int_rows_body<T>(j, r0, r1, buf);                                                     \
  }                                                                                             \
  template <class T>                                                                            \
  attr void quant_fp4_rows_##suffix(const Fp4Job& j, int64_t r0, int64_t r1, float* buf) {      \
    quant_fp4_rows_body<T>(j, r0, r1, buf);                                                     \
  }                                                                                             \
  template <class T>                                                                            \
  attr void amax_rows_##suffix(const Fp4Job& j, int64_t r0, int64_t r1, float* buf) {           \
    amax_rows_body<T>(j, r0, r1, buf);                                                          \
  }

#if defined(__x86_64__) || defined(__i386__)
CALIBRA_ISA_FUNCS(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))))
CALIBRA_ISA_FUNCS(avx2, __attribute__((target("avx2"))))
#endif
CALIBRA_ISA_FUNCS(base, )

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

template <class T>
void quant_int_rows(const IntJob& j, int64_t r0, int64_t r1, float* buf) {
  switch (isa()) {
#if defined(__x86_64__) || defined(__i386__)
    case Isa::kAvx512: quant_int_rows_avx512<T>(j, r0, r1, buf); return;
    case Isa::kAvx2: quant_int_rows_avx2<T>(j, r0, r1, buf); return;
#endif
    default: quant_int_rows_base<T>(j, r0, r1, buf); return;
  }
}
template <class T>
void quant_fp4_rows(const Fp4Job& j, int64_t r0, int64_t r1, float* buf) {
  switch (isa()) {
#if defined(__x86_64__) || defined(__i386__)
    case Isa::kAvx512: quant_fp4_rows_avx512<T>(j, r0, r1, buf); return;
    case Isa::kAvx2: quant_fp4_rows_avx2<T>(j, r0, r1, buf); return;
#endif
    default: quant_fp4_rows_base<T>(j, r0, r1, buf); return;
  }
}
template <class T>
void amax_rows(const Fp4Job& j, int64_t r0, int64_t r1, float* buf) {
  switch (isa()) {
#if defined(__x86_64__) || defined(__i386__)
    case Isa::kAvx512: amax_rows_avx512<T>(j, r0, r1, buf); return;
    case Isa::kAvx2: amax_rows_avx2<T>(j, r0, r1, buf); return;
#endif
    default: amax_rows_base<T>(j, r0, r1, buf); return;
  }
}

// Calls f(T{}) for w's dtype (float, Half, BFloat16); false for other dtypes.
template <class F>
bool dispatch_w(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(float{}); return true;
    case DType::F16: f(Half{}); return true;
    case DType::BF16: f(BFloat16{}); return true;
    default: return false;
  }
}

int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n)); }

Status non_finite(const char* op, int64_t first, int64_t n) {
  return make_status(StatusCode::kNonFinite, "[%s] w contains NaN/Inf (first at row %lld, col %lld)", op,
                     static_cast<long long>(first / n), static_cast<long long>(first % n));
}

// Scratch for one row of w converted to fp32 (unused for contiguous fp32 rows).
std::vector<float> row_buffer(const TensorArg& w) {
  const bool direct = w.dtype == DType::F32 && w.strides[1] == 1;
  return std::vector<float>(direct ? 0 : static_cast<size_t>(w.shape[1]));
}

int64_t read_row_col(const TensorArg& t, int64_t r, int64_t c) { return r * t.strides[0] + c * t.strides[1]; }

float load_float(const TensorArg& t, int64_t off) {
  switch (t.dtype) {
    case DType::F16: return half_to_float(t.ptr<const uint16_t>()[off]);
    case DType::BF16: return bf16_to_float(t.ptr<const uint16_t>()[off]);
    default: return t.ptr<const float>()[off];
  }
}

template <class T>
void store_out(const TensorArg& out, int64_t idx, float v) {
  out.ptr<T>()[idx] = from_float<T>(v);
}

}  // namespace

// =============================================================================================

Status quantize_int_cpu(const QuantizeIntParams& p) {
  quantize_checks::IntShape sh;
  CALIBRA_RETURN_IF_ERROR(quantize_checks::check_quantize_int(p, sh));
  const int64_t out = sh.out, n = sh.n, groups = sh.groups, gs = sh.gs;
  if (out == 0) return Status::Ok();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  IntJob job{&p, n, gs, groups, static_cast<float>((1 << p.bits) - 1), &first_bad};
  dispatch_w(p.w.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(out, grain_rows(n), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf = row_buffer(p.w);
      quant_int_rows<T>(job, r0, r1, buf.data());
    });
  });
  if (first_bad.load() != std::numeric_limits<int64_t>::max()) return non_finite("quantize", first_bad.load(), n);
  return Status::Ok();
}

Status dequantize_int_cpu(const DequantizeIntParams& p) {
  quantize_checks::IntShape sh;
  CALIBRA_RETURN_IF_ERROR(quantize_checks::check_dequantize_int(p, sh));
  const int64_t out = sh.out, n = sh.n, groups = sh.groups, gs = sh.gs;
  if (out == 0 || n == 0) return Status::Ok();
  const uint8_t* codes = p.codes.ptr<const uint8_t>();
  const uint8_t* zeros = p.zeros.ptr<const uint8_t>();
  dispatch_w(p.out.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(out, grain_rows(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
          const float s = load_float(p.scales, read_row_col(p.scales, r, g));
          const float z = static_cast<float>(zeros[read_row_col(p.zeros, r, g)]);
          const uint8_t* c = codes + read_row_col(p.codes, r, g * gs);
          const int64_t cs = p.codes.strides[1];
          T* o = p.out.ptr<T>() + r * n + g * gs;
          for (int64_t k = 0; k < gs; ++k) o[k] = from_float<T>((static_cast<float>(c[k * cs]) - z) * s);
        }
      }
    });
  });
  return Status::Ok();
}

Status quantize_fp4_cpu(const QuantizeFp4Params& p) {
  quantize_checks::Fp4Shape sh;
  CALIBRA_RETURN_IF_ERROR(quantize_checks::check_quantize_fp4(p, sh));
  const bool mx = sh.mx;
  const int64_t out = sh.out, n = sh.n, gs = sh.gs, groups = n / gs;
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  std::atomic<uint32_t> amax_bits{0};
  Fp4Job job{&p, n, gs, groups, 1.0f, &first_bad, &amax_bits};
  if (!mx && out > 0) {
    dispatch_w(p.w.dtype, [&](auto tag) {
      using T = decltype(tag);
      parallel_for(out, grain_rows(n), [&](int64_t r0, int64_t r1) {
        std::vector<float> buf = row_buffer(p.w);
        amax_rows<T>(job, r0, r1, buf.data());
      });
    });
    if (first_bad.load() != std::numeric_limits<int64_t>::max()) return non_finite("quantize", first_bad.load(), n);
    const float amax = fp4::u2f(amax_bits.load());
    job.gscale = amax == 0.0f ? 1.0f : 2688.0f / amax;
  }
  *p.global_scale.ptr<float>() = job.gscale;
  if (out == 0) return Status::Ok();
  dispatch_w(p.w.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(out, grain_rows(n), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf = row_buffer(p.w);
      quant_fp4_rows<T>(job, r0, r1, buf.data());
    });
  });
  if (first_bad.load() != std::numeric_limits<int64_t>::max()) return non_finite("quantize", first_bad.load(), n);
  return Status::Ok();
}

Status dequantize_fp4_cpu(const DequantizeFp4Params& p) {
  quantize_checks::Fp4Shape sh;
  CALIBRA_RETURN_IF_ERROR(quantize_checks::check_dequantize_fp4(p, sh));
  const bool mx = sh.mx;
  const int64_t out = sh.out, n = sh.n, gs = sh.gs;
  if (out == 0 || n == 0) return Status::Ok();
  const float gscale = *p.global_scale.ptr<const float>();
  const uint8_t* codes = p.codes.ptr<const uint8_t>();
  const uint8_t* scales = p.scales.ptr<const uint8_t>();
  const int64_t groups = n / gs;
  dispatch_w(p.out.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(out, grain_rows(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t sb = scales[read_row_col(p.scales, r, g)];
          float d;
          if (mx) d = sb == 255 ? std::numeric_limits<float>::quiet_NaN() : fp4::exp2_int(static_cast<int>(sb) - 127);
          else d = fp4::e4m3_to_float(sb) / gscale;
          const uint8_t* c = codes + read_row_col(p.codes, r, g * gs);
          const int64_t cs = p.codes.strides[1];
          T* o = p.out.ptr<T>() + r * n + g * gs;
          for (int64_t k = 0; k < gs; ++k) o[k] = from_float<T>(fp4::e2m1_decode(c[k * cs]) * d);
        }
      }
    });
  });
  return Status::Ok();
}

Status float_to_e4m3_cpu(const TensorArg& x, const TensorArg& out) {
  if (x.dtype != DType::F32 || !x.is_contiguous() || out.dtype != DType::U8 || !out.is_contiguous() ||
      out.numel() != x.numel())
    return make_status(StatusCode::kInvalidArgument, "[float_to_e4m3] x float32 and out uint8 must be contiguous and the same size");
  const float* src = x.ptr<const float>();
  uint8_t* dst = out.ptr<uint8_t>();
  parallel_for(x.numel(), 1 << 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) dst[i] = fp4::e4m3_from_float(src[i]);
  });
  return Status::Ok();
}

}  // namespace calibra
