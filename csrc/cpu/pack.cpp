// calibra::pack / calibra::unpack on CPU.
//
// The bit stream of a line is produced 8 codes at a time: 8 codes loaded as one uint64 (one per
// byte) are squeezed by three SWAR steps into 8*bits contiguous bits, i.e. exactly `bits` bytes of the
// little-endian byte stream; any bits in 1..8 work the same way. On a little-endian host the byte
// stream *is* the sequence of uint32 (or uint8) words, so words are written as bytes. Lines are
// processed in tiles: lines whose codes are strided are first gathered into a contiguous scratch
// tile, and dim-0 outputs (word k of line l at out[k, l]) are assembled in a scratch tile and then
// written a row of the tile at a time. Tiles run in parallel.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "calibra/parallel.h"
#include "calibra/params/pack.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "calibra's CPU pack assumes a little-endian host");

namespace calibra {
namespace {

constexpr uint64_t kLanes = 0x0101010101010101ull;

inline uint64_t load_u64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
inline void store_u64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }

// 8 codes, one per byte, each < 2^b  ->  8*b bits with code j at bits [j*b, (j+1)*b).
inline uint64_t squeeze(uint64_t x, int b) {
  x = (x & 0x00FF00FF00FF00FFull) | ((x & 0xFF00FF00FF00FF00ull) >> (8 - b));
  x = (x & 0x0000FFFF0000FFFFull) | ((x & 0xFFFF0000FFFF0000ull) >> (16 - 2 * b));
  x = (x & 0x00000000FFFFFFFFull) | ((x >> 32) << (4 * b));
  return x;
}

// Inverse of squeeze: 8*b bits -> 8 codes, one per byte.
inline uint64_t spread(uint64_t x, int b) {
  const uint64_t m4 = (1ull << (4 * b)) - 1;
  x = (x & m4) | (((x >> (4 * b)) & m4) << 32);
  const uint64_t m2 = ((1ull << (2 * b)) - 1) * 0x0000000100000001ull;
  x = (x & m2) | (((x >> (2 * b)) & m2) << 16);
  const uint64_t m1 = ((1ull << b) - 1) * 0x0001000100010001ull;
  x = (x & m1) | (((x >> b) & m1) << 8);
  return x;
}

// Writes the row_bytes bytes of one line's words from n codes at src (contiguous). When `padded`,
// src may be read up to the next multiple of 8 (zero-filled). Returns nonzero if a code was >= 2^b.
uint64_t pack_line(const uint8_t* src, int64_t n, int b, bool padded, uint8_t* dst, int64_t row_bytes) {
  const uint64_t keep = static_cast<uint64_t>((1u << b) - 1u) * kLanes;
  const int64_t full = n / 8;
  // Groups whose 8-byte store stays inside the row (each store's bytes past the group's own b bytes
  // are zero and are overwritten by the next group).
  const int64_t fast = row_bytes >= 8 ? std::min(full, (row_bytes - 8) / b + 1) : 0;
  uint64_t bad = 0;
  for (int64_t g = 0; g < fast; ++g) {
    const uint64_t x = load_u64(src + 8 * g);
    bad |= x & ~keep;
    store_u64(dst + g * b, squeeze(x, b));
  }
  auto slow_group = [&](int64_t g, uint64_t x) {
    bad |= x & ~keep;
    const uint64_t v = squeeze(x, b);
    const int64_t o = g * b;
    const int64_t cnt = std::min<int64_t>(8, row_bytes - o);
    for (int64_t t = 0; t < cnt; ++t) dst[o + t] = static_cast<uint8_t>(v >> (8 * t));
  };
  for (int64_t g = fast; g < full; ++g) slow_group(g, load_u64(src + 8 * g));
  int64_t groups = full;
  const int64_t rem = n - 8 * full;
  if (rem) {
    uint64_t x = 0;
    if (padded) {
      x = load_u64(src + 8 * full);
    } else {
      for (int64_t t = 0; t < rem; ++t) x |= static_cast<uint64_t>(src[8 * full + t]) << (8 * t);
    }
    slow_group(full, x);
    ++groups;
  }
  const int64_t covered = groups ? std::min<int64_t>(row_bytes, (groups - 1) * b + 8) : 0;
  if (covered < row_bytes) std::memset(dst + covered, 0, static_cast<size_t>(row_bytes - covered));
  return bad;
}

// The n codes of one line from its row_bytes stream bytes; dst gets exactly n bytes.
void unpack_line(const uint8_t* bytes, int64_t row_bytes, int64_t n, int b, uint8_t* dst) {
  const uint64_t low = b == 8 ? ~0ull : (1ull << (8 * b)) - 1;
  const int64_t groups = (n + 7) / 8;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t o = g * b;
    uint64_t x;
    if (o + 8 <= row_bytes) {
      x = load_u64(bytes + o);
    } else {
      x = 0;
      const int64_t cnt = std::min<int64_t>(8, row_bytes - o);
      for (int64_t t = 0; t < cnt; ++t) x |= static_cast<uint64_t>(bytes[o + t]) << (8 * t);
    }
    const uint64_t v = spread(x & low, b);
    const int64_t i = 8 * g;
    if (i + 8 <= n) {
      store_u64(dst + i, v);
    } else {
      for (int64_t t = 0; t < n - i; ++t) dst[i + t] = static_cast<uint8_t>(v >> (8 * t));
    }
  }
}

int64_t word_bytes(DType t) { return t == DType::I32 ? 4 : 1; }

// Tile height: enough lines to write 32 contiguous words per output row for dim 0, while the
// scratch stays about L2-sized.
int64_t tile_lines(int64_t line_bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(32, (256 * 1024) / std::max<int64_t>(1, line_bytes)));
}

}  // namespace

Status pack_cpu(const PackParams& p) {
  const TensorArg& c = p.codes;
  if (c.ndim != 2 || c.dtype != DType::U8)
    return make_status(StatusCode::kInvalidArgument, "[pack] codes must be a 2-D uint8 tensor");
  if (p.bits < 1 || p.bits > 8)
    return make_status(StatusCode::kInvalidArgument, "[pack] bits must be in [1, 8], got %lld", static_cast<long long>(p.bits));
  if (p.dim != 0 && p.dim != 1)
    return make_status(StatusCode::kInvalidArgument, "[pack] dim must be 0 or 1, got %lld", static_cast<long long>(p.dim));
  if ((p.out.dtype != DType::I32 && p.out.dtype != DType::U8) || p.out.ndim != 2 || !p.out.is_contiguous())
    return make_status(StatusCode::kInvalidArgument, "[pack] out must be a contiguous 2-D int32 or uint8 tensor");
  const int b = static_cast<int>(p.bits);
  const int64_t R = c.shape[0], C = c.shape[1];
  const bool d1 = p.dim == 1;
  const int64_t n = d1 ? C : R, L = d1 ? R : C;
  const int64_t es = d1 ? c.strides[1] : c.strides[0], ls = d1 ? c.strides[0] : c.strides[1];
  const int64_t wbytes = word_bytes(p.out.dtype);
  const int64_t nw = (n * b + 8 * wbytes - 1) / (8 * wbytes);
  const int64_t expect0 = d1 ? R : nw, expect1 = d1 ? nw : C;
  if (p.out.shape[0] != expect0 || p.out.shape[1] != expect1)
    return make_status(StatusCode::kInvalidArgument, "[pack] out must be [%lld, %lld], got [%lld, %lld]",
                       static_cast<long long>(expect0), static_cast<long long>(expect1),
                       static_cast<long long>(p.out.shape[0]), static_cast<long long>(p.out.shape[1]));
  if (L == 0 || n == 0) return Status::Ok();

  const uint8_t* src = c.ptr<const uint8_t>();
  uint8_t* ob = p.out.ptr<uint8_t>();
  const int64_t row_bytes = nw * wbytes;
  const int64_t npad = (n + 7) / 8 * 8;
  const bool direct_src = es == 1;
  const int64_t T = tile_lines(std::max(direct_src ? 0 : npad, d1 ? 0 : row_bytes));
  const int64_t tiles = (L + T - 1) / T;
  std::atomic<bool> any_bad{false};

  parallel_for(tiles, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, T * n)), [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> cs(direct_src ? 0 : static_cast<size_t>(T * npad));
    std::vector<uint8_t> ds(d1 ? 0 : static_cast<size_t>(T * row_bytes));
    uint64_t bad = 0;
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t l0 = tile * T, nt = std::min(T, L - l0);
      if (!direct_src) {
        if (std::abs(ls) <= std::abs(es)) {  // lines adjacent in memory: walk them innermost
          for (int64_t i = 0; i < n; ++i) {
            const uint8_t* s = src + l0 * ls + i * es;
            for (int64_t t = 0; t < nt; ++t) cs[t * npad + i] = s[t * ls];
          }
        } else {
          for (int64_t t = 0; t < nt; ++t) {
            const uint8_t* s = src + (l0 + t) * ls;
            for (int64_t i = 0; i < n; ++i) cs[t * npad + i] = s[i * es];
          }
        }
        for (int64_t t = 0; t < nt; ++t) std::memset(&cs[t * npad + n], 0, static_cast<size_t>(npad - n));
      }
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t l = l0 + t;
        const uint8_t* line = direct_src ? src + l * ls : &cs[t * npad];
        uint8_t* dst = d1 ? ob + l * row_bytes : &ds[t * row_bytes];
        bad |= pack_line(line, n, b, !direct_src, dst, row_bytes);
      }
      if (!d1) {  // word k of line l goes to out[k, l]
        for (int64_t k = 0; k < nw; ++k) {
          uint8_t* orow = ob + (k * L + l0) * wbytes;
          if (wbytes == 4) {
            for (int64_t t = 0; t < nt; ++t) std::memcpy(orow + 4 * t, &ds[t * row_bytes + 4 * k], 4);
          } else {
            for (int64_t t = 0; t < nt; ++t) orow[t] = ds[t * row_bytes + k];
          }
        }
      }
    }
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  });

  if (any_bad.load()) {  // report the first offender in row-major order, like the reference
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < C; ++j) {
        const unsigned v = src[r * c.strides[0] + j * c.strides[1]];
        if (v >> b)
          return make_status(StatusCode::kInvalidArgument, "[pack] codes must be < 2**bits (found %u at row %lld, col %lld)",
                             v, static_cast<long long>(r), static_cast<long long>(j));
      }
  }
  return Status::Ok();
}

Status unpack_cpu(const UnpackParams& p) {
  const TensorArg& w = p.words;
  if (w.ndim != 2 || (w.dtype != DType::I32 && w.dtype != DType::U8))
    return make_status(StatusCode::kInvalidArgument, "[unpack] words must be a 2-D int32 or uint8 tensor");
  if (p.bits < 1 || p.bits > 8)
    return make_status(StatusCode::kInvalidArgument, "[unpack] bits must be in [1, 8], got %lld", static_cast<long long>(p.bits));
  if (p.dim != 0 && p.dim != 1)
    return make_status(StatusCode::kInvalidArgument, "[unpack] dim must be 0 or 1, got %lld", static_cast<long long>(p.dim));
  if (p.out.dtype != DType::U8 || p.out.ndim != 2 || !p.out.is_contiguous() || p.length < 0)
    return make_status(StatusCode::kInvalidArgument, "[unpack] out must be a contiguous 2-D uint8 tensor");
  const int b = static_cast<int>(p.bits);
  const bool d1 = p.dim == 1;
  const int64_t n = p.length;
  const int64_t L = d1 ? w.shape[0] : w.shape[1];
  const int64_t wbytes = word_bytes(w.dtype);
  const int64_t nw = (n * b + 8 * wbytes - 1) / (8 * wbytes);
  const int64_t have = d1 ? w.shape[1] : w.shape[0];
  if (have != nw)
    return make_status(StatusCode::kInvalidArgument, "[unpack] words has %lld words along dim %lld, length %lld needs %lld",
                       static_cast<long long>(have), static_cast<long long>(p.dim), static_cast<long long>(n),
                       static_cast<long long>(nw));
  const int64_t expect0 = d1 ? L : n, expect1 = d1 ? n : L;
  if (p.out.shape[0] != expect0 || p.out.shape[1] != expect1)
    return make_status(StatusCode::kInvalidArgument, "[unpack] out must be [%lld, %lld]", static_cast<long long>(expect0),
                       static_cast<long long>(expect1));
  if (L == 0 || n == 0) return Status::Ok();

  const uint8_t* wb = w.ptr<const uint8_t>();
  uint8_t* ob = p.out.ptr<uint8_t>();
  const int64_t wks = d1 ? w.strides[1] : w.strides[0], wls = d1 ? w.strides[0] : w.strides[1];
  const int64_t row_bytes = nw * wbytes;
  const int64_t npad = (n + 7) / 8 * 8;
  const bool direct_src = wks == 1;
  const int64_t T = tile_lines(std::max(direct_src ? 0 : row_bytes, d1 ? 0 : npad));
  const int64_t tiles = (L + T - 1) / T;
  parallel_for(tiles, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, T * n)), [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> bs(direct_src ? 0 : static_cast<size_t>(T * row_bytes));
    std::vector<uint8_t> ds(d1 ? 0 : static_cast<size_t>(T * npad));
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t l0 = tile * T, nt = std::min(T, L - l0);
      if (!direct_src) {
        for (int64_t k = 0; k < nw; ++k)
          for (int64_t t = 0; t < nt; ++t)
            std::memcpy(&bs[t * row_bytes + k * wbytes], wb + ((l0 + t) * wls + k * wks) * wbytes, static_cast<size_t>(wbytes));
      }
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t l = l0 + t;
        const uint8_t* bytes = direct_src ? wb + l * wls * wbytes : &bs[t * row_bytes];
        uint8_t* dst = d1 ? ob + l * n : &ds[t * npad];
        unpack_line(bytes, row_bytes, n, b, dst);
      }
      if (!d1) {
        for (int64_t i = 0; i < n; ++i) {
          uint8_t* orow = ob + i * L + l0;
          for (int64_t t = 0; t < nt; ++t) orow[t] = ds[t * npad + i];
        }
      }
    }
  });
  return Status::Ok();
}

}  // namespace calibra
