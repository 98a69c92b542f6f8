// calibra::gptq_block_sweep on CPU. Rows of W are independent in GPTQ's column sweep (H couples
// columns, never rows), so the kernel takes 16 rows at a time as the 16 lanes of one fp32 vector: the
// block is transposed into a [C][16] tile, and every column step -- quantize, scale the error, push it
// onto the remaining columns -- is a handful of 16-wide vector operations. Tiles are spread over the
// thread pool. Each element goes through exactly the operations of calibra.ops._ref.gptq in the same
// order (true divisions, mul-then-sub with no FMA contraction), so the results are bit-identical.
// Compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time, like quantize.cpp.
//
// calibra::sparsegpt_block_sweep runs the same tile body with N:M selection switched on (Job::nm_m > 0):
// at each group's first column the tile ranks the group's m saliencies lane-wise (O(m^2) vector
// compares, the pairwise rule of params/gptq.h) and keeps the prune lanes of the group's columns; the
// chosen mask is transposed out with the other outputs.
#include <cstring>
#include <vector>

#include "calibra/fp4.h"
#include "calibra/parallel.h"
#include "calibra/params/gptq.h"
#include "calibra/params/gptq_checks.h"
#include "calibra/quant_math.h"

#define CALIBRA_AI __attribute__((always_inline)) inline
#pragma GCC diagnostic ignored "-Wpsabi"

namespace calibra {
namespace {

constexpr int L = 16;  // rows per tile = lanes per vector
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

CALIBRA_AI vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
CALIBRA_AI void st(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
CALIBRA_AI vf splat(float f) { return vf{} + f; }
CALIBRA_AI vf vmin(vf a, vf b) { return a < b ? a : b; }
CALIBRA_AI vf vmax(vf a, vf b) { return a > b ? a : b; }
CALIBRA_AI vf sel(vi m, vf a, vf b) { return m ? a : b; }
CALIBRA_AI vi sel(vi m, vi a, vi b) { return m ? a : b; }

struct Job {
  const GptqSweepParams* p;
  int64_t rows, cols, groups, nshrink;
  float maxq;
  const float* u;       // [C, C] contiguous
  const int32_t* group;
  const int32_t* fit;
  const float* shrink;
  int64_t nm_n, nm_m;  // sparsegpt_block_sweep: keep n of every m (nm_m == 0: the mask input, if any)
  uint8_t* prune;      // sparsegpt_block_sweep: [R, C] bool output
};

// N:M selection for one group of m columns starting at column i of the tile: prune lanes (all-ones =
// prune) of the group's columns into gm[0..m). sal = x^2 / (u_jj * u_jj); rank(j) = #{k: s_k > s_j} +
// #{k < j: s_k == s_j} (for k < j the two terms are s_k >= s_j); prune where rank >= n.
CALIBRA_AI void select_nm(const Job& j, const float* xg, int64_t i, vi* gm) {
  const int64_t m = j.nm_m, C = j.cols;
  vf sal[kMaxNmM];
  for (int64_t c = 0; c < m; ++c) {
    const float d = j.u[(i + c) * C + (i + c)];
    const vf x = ld(xg + c * L);
    sal[c] = (x * x) / splat(d * d);
  }
  const vi nv = vi{} + static_cast<int32_t>(j.nm_n);
  for (int64_t c = 0; c < m; ++c) {
    vi rank{};
    for (int64_t k = 0; k < c; ++k) rank -= sal[k] >= sal[c];  // a true compare is -1
    for (int64_t k = c + 1; k < m; ++k) rank -= sal[k] > sal[c];
    gm[c] = rank >= nv;
  }
}

// Quantize 16 values with one lane's params each; returns the values, writes the codes.
CALIBRA_AI vf quant(const Job& j, vf x, vf s, vf z, vi* code) {
  const SweepFormat f = j.p->format;
  if (f == SweepFormat::kNone) {
    *code = vi{};
    return x;
  }
  if (f == SweepFormat::kInt) {
    // qmath::int_code / int_dequant, lane-wise
    vf q = x / s;
    q = vmax(q, splat(-qmath::kClampRound));
    q = vmin(q, splat(qmath::kClampRound));
    q = ((q + splat(qmath::kMagic)) - splat(qmath::kMagic)) + z;
    q = vmax(q, splat(0.0f));
    q = vmin(q, splat(j.maxq));
    *code = __builtin_convertvector(q, vi);
    return (q - z) * s;
  }
  // FP4: d = S / global_scale; code = e2m1(x / d) (0 where d == 0); value = e2m1(code) * d
  const vf d = s / splat(j.p->global_scale);
  const vf v = x / d;
  const vi absmask = vi{} + 0x7fffffff;
  const vf a = reinterpret_cast<vf>(reinterpret_cast<vi>(v) & absmask);
  const vi zi = vi{};
  const vi idx = zi - ((a > splat(0.25f)) + (a >= splat(0.75f)) + (a > splat(1.25f)) + (a >= splat(1.75f)) +
                       (a > splat(2.5f)) + (a >= splat(3.5f)) + (a > splat(5.0f)));
  const vi dz = d == splat(0.0f);
  const vi neg = (reinterpret_cast<vi>(v) >> 31) & (idx != zi);  // all-ones where negative and nonzero
  *code = sel(dz, zi, idx | (neg & (vi{} + 8)));
  // E2M1 magnitude of idx: [0, .5, 1, 1.5, 2, 3, 4, 6] as exact sums of steps
  const vf half = splat(0.5f), one = splat(1.0f), two = splat(2.0f), zf = splat(0.0f);
  vf mag = sel(idx >= 1, half, zf) + sel(idx >= 2, half, zf) + sel(idx >= 3, half, zf) + sel(idx >= 4, half, zf);
  mag = mag + sel(idx >= 5, one, zf) + sel(idx >= 6, one, zf) + sel(idx >= 7, two, zf);
  const vf val = sel(neg, zf - mag, mag) * d;
  return sel(dz, zf, val);
}

// Fit the params of 16 rows from the n current columns xt[0..n) ([n][16] tile), writing s and z.
CALIBRA_AI void fit_lanes(const Job& j, const float* xt, int64_t n, float* s_out, float* z_out) {
  const GptqSweepParams& p = *j.p;
  if (p.format == SweepFormat::kNone) {
    for (int l = 0; l < L; ++l) { s_out[l] = 1.0f; z_out[l] = 0.0f; }
    return;
  }
  vf mn{}, mx{};
  for (int64_t c = 0; c < n; ++c) {
    const vf v = ld(xt + c * L);
    mn = vmin(v, mn);
    mx = vmax(v, mx);
  }
  alignas(64) float amn[L], amx[L], cs[L], cz[L], best_e[L] = {};
  st(amn, mn);
  st(amx, mx);
  for (int64_t k = 0; k < j.nshrink; ++k) {
    const float pk = j.shrink[k];
    for (int l = 0; l < L; ++l) {
      if (p.format == SweepFormat::kInt) {
        const float mnp = amn[l] * pk, mxp = amx[l] * pk;
        cs[l] = qmath::round_scale(p.scale_dtype, qmath::int_raw_scale(mnp, mxp, j.maxq, p.symmetric));
        cz[l] = qmath::int_zero(mnp, cs[l], j.maxq, p.symmetric);
      } else {
        const float a = (-amn[l] > amx[l] ? -amn[l] : amx[l]) * pk;
        if (p.format == SweepFormat::kNvfp4)
          cs[l] = fp4::e4m3_to_float(fp4::e4m3_from_float((a / 6.0f) * p.global_scale));
        else
          cs[l] = a == 0.0f ? 0.0f : fp4::exp2_int(fp4::mx_exponent(a));
        cz[l] = 0.0f;
      }
    }
    if (j.nshrink == 1) {
      std::memcpy(s_out, cs, sizeof(cs));
      std::memcpy(z_out, cz, sizeof(cz));
      return;
    }
    const vf vs = ld(cs), vz = ld(cz);
    vf e{};
    vi code;
    for (int64_t c = 0; c < n; ++c) {
      const vf x = ld(xt + c * L);
      const vf diff = quant(j, x, vs, vz, &code) - x;
      e = e + diff * diff;
    }
    if (k == 0) {
      st(best_e, e);
      std::memcpy(s_out, cs, sizeof(cs));
      std::memcpy(z_out, cz, sizeof(cz));
    } else {
      const vi better = e < ld(best_e);
      st(best_e, sel(better, e, ld(best_e)));
      st(s_out, sel(better, vs, ld(s_out)));
      st(z_out, sel(better, vz, ld(z_out)));
    }
  }
}

CALIBRA_AI void sweep_tile_body(const Job& j, int64_t r0, float* xt, float* qt, float* et, uint8_t* ct,
                                uint8_t* pt, float* ts, float* tz) {
  const GptqSweepParams& p = *j.p;
  const int64_t C = j.cols, G = j.groups, R = j.rows;
  const int64_t nl = R - r0 < L ? R - r0 : L;
  const float* w = p.w.ptr<const float>();
  const float* sin = p.scales.ptr<const float>();
  const float* zin = p.zeros.ptr<const float>();
  const uint8_t* mask = p.mask.numel() ? p.mask.ptr<const uint8_t>() : nullptr;
  // transpose the tile in: xt[c][l] = w[r0 + l][c]; absent rows are zeros (fit to scale 1, harmless)
  std::memset(xt, 0, sizeof(float) * static_cast<size_t>(C * L));
  for (int64_t l = 0; l < nl; ++l)
    for (int64_t c = 0; c < C; ++c) xt[c * L + l] = w[(r0 + l) * C + c];
  for (int64_t g = 0; g < G; ++g)
    for (int l = 0; l < L; ++l) {
      ts[g * L + l] = l < nl ? sin[(r0 + l) * G + g] : 1.0f;
      tz[g * L + l] = l < nl ? zin[(r0 + l) * G + g] : 0.0f;
    }
  alignas(64) float mrow[L];
  const int64_t nm = j.nm_m;
  vi gm[kMaxNmM];  // N:M: the prune lanes of the current group's columns
  for (int64_t i = 0; i < C; ++i) {
    const int64_t g = j.group[i];
    if (nm && i % nm == 0) select_nm(j, xt + i * L, i, gm);
    if (j.fit[i] > 0) fit_lanes(j, xt + i * L, j.fit[i], ts + g * L, tz + g * L);
    const vf x = ld(xt + i * L);
    vi code;
    vf v = quant(j, x, ld(ts + g * L), ld(tz + g * L), &code);
    if (mask || nm) {
      vi m;
      if (nm) {
        m = gm[i % nm];
        for (int l = 0; l < L; ++l) pt[i * L + l] = m[l] ? 1 : 0;
      } else {
        for (int l = 0; l < L; ++l) mrow[l] = (l < nl && mask[(r0 + l) * C + i]) ? 1.0f : 0.0f;
        m = ld(mrow) != splat(0.0f);
      }
      v = sel(m, splat(0.0f), v);
      const vi zcode = p.format == SweepFormat::kInt ? __builtin_convertvector(ld(tz + g * L), vi) : vi{};
      code = sel(m, zcode, code);
    }
    const vf e = (x - v) / splat(j.u[i * C + i]);
    st(qt + i * L, v);
    st(et + i * L, e);
    for (int l = 0; l < L; ++l) ct[i * L + l] = static_cast<uint8_t>(code[l]);
    // push the error onto the later columns: x[c] -= e * u[i, c] (mul, then sub: no FMA)
    const float* ui = j.u + i * C;
    for (int64_t c = i + 1; c < C; ++c) st(xt + c * L, ld(xt + c * L) - e * splat(ui[c]));
  }
  // transpose the outputs back
  float* q = p.q.ptr<float>();
  float* err = p.err.ptr<float>();
  uint8_t* codes = p.codes.ptr<uint8_t>();
  float* so = p.scales_out.ptr<float>();
  float* zo = p.zeros_out.ptr<float>();
  for (int64_t l = 0; l < nl; ++l) {
    const int64_t r = r0 + l;
    for (int64_t c = 0; c < C; ++c) {
      q[r * C + c] = qt[c * L + l];
      err[r * C + c] = et[c * L + l];
      codes[r * C + c] = ct[c * L + l];
    }
    if (nm)
      for (int64_t c = 0; c < C; ++c) j.prune[r * C + c] = pt[c * L + l];
    for (int64_t g = 0; g < G; ++g) {
      so[r * G + g] = ts[g * L + l];
      zo[r * G + g] = tz[g * L + l];
    }
  }
}

#define CALIBRA_SWEEP_ISA(suffix, attr)                                                              \
  attr void sweep_tile_##suffix(const Job& j, int64_t r0, float* xt, float* qt, float* et, uint8_t* ct, \
                                uint8_t* pt, float* ts, float* tz) {                                 \
    sweep_tile_body(j, r0, xt, qt, et, ct, pt, ts, tz);                                              \
  }

#if defined(__x86_64__) || defined(__i386__)
CALIBRA_SWEEP_ISA(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))))
CALIBRA_SWEEP_ISA(avx2, __attribute__((target("avx2"))))
#endif
CALIBRA_SWEEP_ISA(base, )

using TileFn = void (*)(const Job&, int64_t, float*, float*, float*, uint8_t*, uint8_t*, float*, float*);

TileFn pick_tile_fn() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return sweep_tile_avx512;
  if (__builtin_cpu_supports("avx2")) return sweep_tile_avx2;
#endif
  return sweep_tile_base;
}

// The shared entry: validates, then runs the tiles. nm_m == 0: gptq_block_sweep (mask input optional);
// nm_m > 0: sparsegpt_block_sweep (no mask input; prune is the [R, C] bool output).
Status run_sweep(const GptqSweepParams& p, const char* op, int64_t nm_n, int64_t nm_m, const TensorArg* prune) {
  CALIBRA_RETURN_IF_ERROR(gptq_checks::check_sweep(p, op, nm_n, nm_m, prune));
  const int64_t R = p.w.shape[0], C = p.w.shape[1], G = p.scales.shape[1];
  const int32_t* group = p.group.ptr<const int32_t>();
  const int32_t* fit = p.fit.ptr<const int32_t>();
  for (int64_t i = 0; i < C; ++i) {
    if (group[i] < 0 || group[i] >= G)
      return make_status(StatusCode::kInvalidArgument, "%s group entries must be in [0, %lld), got %d at column %lld", op,
                         static_cast<long long>(G), group[i], static_cast<long long>(i));
    if (fit[i] < 0 || i + fit[i] > C)
      return make_status(StatusCode::kInvalidArgument,
                         "%s fit[i] must be >= 0 with i + fit[i] <= %lld (fits stay in the block), got %d at column %lld",
                         op, static_cast<long long>(C), fit[i], static_cast<long long>(i));
  }
  if (R == 0 || C == 0) {
    return Status::Ok();
  }
  Job job{&p, R, C, G, p.shrink.shape[0], static_cast<float>((1 << p.bits) - 1), p.u.ptr<const float>(), group, fit,
          p.shrink.ptr<const float>(), prune ? nm_n : 0, prune ? nm_m : 0,
          prune ? prune->ptr<uint8_t>() : nullptr};
  static const TileFn tile = pick_tile_fn();
  const int64_t tiles = (R + L - 1) / L;
  parallel_for(tiles, 1, [&](int64_t t0, int64_t t1) {
    // per-chunk scratch: the transposed tile, its outputs and the tile's parameter table
    std::vector<float> buf(static_cast<size_t>((3 * C + 2 * G) * L) + 16);
    std::vector<uint8_t> cbuf(static_cast<size_t>(C * L) * (prune ? 2 : 1));
    float* base = buf.data();
    while (reinterpret_cast<uintptr_t>(base) % 64) ++base;
    float* xt = base;
    float* qt = xt + C * L;
    float* et = qt + C * L;
    float* ts = et + C * L;
    float* tz = ts + G * L;
    uint8_t* pt = prune ? cbuf.data() + C * L : nullptr;
    for (int64_t t = t0; t < t1; ++t) tile(job, t * L, xt, qt, et, cbuf.data(), pt, ts, tz);
  });
  return Status::Ok();
}

}  // namespace

Status gptq_block_sweep_cpu(const GptqSweepParams& p) { return run_sweep(p, "[gptq_block_sweep]", 0, 0, nullptr); }

Status sparsegpt_block_sweep_cpu(const SparsegptSweepParams& p) {
  return run_sweep(p.sweep, "[sparsegpt_block_sweep]", p.n, p.m, &p.prune);
}

}  // namespace calibra
