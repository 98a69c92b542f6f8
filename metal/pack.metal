// calibra::pack / calibra::unpack on Metal: the dense LSB-first bit stream of python/calibra/ops/pack.py.
// pack: one thread per output word, which gathers the (at most wb / bits + 2) codes overlapping its
// bits. unpack: one thread per code, which reads the one or two words holding it. Integer work only,
// so the words equal the reference exactly. Codes >= 2**bits are rejected by the host before dispatch.
#include <metal_stdlib>
using namespace metal;
#include "calibra_common.h"

kernel void cal_pack(device const uchar* codes [[buffer(0)]],
                     device uchar* out [[buffer(1)]],
                     constant PackArgs& a [[buffer(2)]],
                     uint t [[thread_position_in_grid]]) {
  const ulong lines = a.dim == 1 ? ulong(a.rows) : ulong(a.cols);
  const ulong len = a.dim == 1 ? ulong(a.cols) : ulong(a.rows);
  if (ulong(t) >= lines * ulong(a.words)) return;
  const ulong line = t / ulong(a.words), k = t % ulong(a.words);
  const ulong bits = ulong(a.bits), wb = ulong(a.word_bits);
  const ulong first = k * wb / bits;
  const ulong last_bit = k * wb + wb - 1;
  const ulong last = min(len == 0 ? 0 : len - 1, last_bit / bits);
  uint word = 0;
  for (ulong i = first; i <= last && i < len; ++i) {
    const uint c = a.dim == 1 ? uint(codes[line * ulong(a.cols) + i]) : uint(codes[i * ulong(a.cols) + line]);
    const long shift = long(i * bits) - long(k * wb);
    word |= shift >= 0 ? c << uint(shift) : c >> uint(-shift);
  }
  const ulong o = a.dim == 1 ? line * ulong(a.words) + k : k * ulong(a.cols) + line;
  if (a.word_bits == 32) ((device uint*)out)[o] = word;
  else out[o] = uchar(word & 0xffu);
}

kernel void cal_unpack(device const uchar* words [[buffer(0)]],
                       device uchar* codes [[buffer(1)]],
                       constant PackArgs& a [[buffer(2)]],
                       uint t [[thread_position_in_grid]]) {
  if (ulong(t) >= ulong(a.rows) * ulong(a.cols)) return;
  const ulong r = t / ulong(a.cols), c = t % ulong(a.cols);
  const ulong line = a.dim == 1 ? r : c, i = a.dim == 1 ? c : r;
  const ulong bits = ulong(a.bits), wb = ulong(a.word_bits);
  const ulong s = i * bits, k = s / wb, off = s % wb;
  // word k (and k + 1) of this line
  const ulong o0 = a.dim == 1 ? line * ulong(a.words) + k : k * ulong(a.cols) + line;
  const ulong o1 = a.dim == 1 ? o0 + 1 : o0 + ulong(a.cols);
  const bool two = off + bits > wb;
  uint w0, w1 = 0;
  if (a.word_bits == 32) {
    w0 = ((device const uint*)words)[o0];
    if (two) w1 = ((device const uint*)words)[o1];
  } else {
    w0 = uint(words[o0]);
    if (two) w1 = uint(words[o1]);
  }
  uint v = w0 >> uint(off);
  if (two) v |= w1 << uint(wb - off);
  codes[t] = uchar(v & ((1u << uint(bits)) - 1u));
}
