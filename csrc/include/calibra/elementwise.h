// Typed loads/stores between storage dtypes and the fp32/fp64 compute type, for host kernels.
#pragma once
#include "calibra/dtype.h"
#include "calibra/half.h"

namespace calibra {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }
inline float to_float(Half v) { return half_to_float(v.bits); }
inline float to_float(BFloat16 v) { return bf16_to_float(v.bits); }

template <class T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline Half from_float<Half>(float v) { return Half{float_to_half(v)}; }
template <> inline BFloat16 from_float<BFloat16>(float v) { return BFloat16{float_to_bf16(v)}; }
template <class T> inline T from_double(double v);
template <> inline double from_double<double>(double v) { return v; }

// Calls f(T{}) with T the storage type for a floating dtype (float, Half, BFloat16, double).
// Returns false for a dtype that is not floating.
template <class F>
bool dispatch_floating(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(float{}); return true;
    case DType::F16: f(Half{}); return true;
    case DType::BF16: f(BFloat16{}); return true;
    case DType::F64: f(double{}); return true;
    default: return false;
  }
}

// fp32 compute for 16/32-bit storage, fp64 for double.
template <class T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };

}  // namespace calibra
