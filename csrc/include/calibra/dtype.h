// Element types that cross the binding. The integer codes are part of the contract with
// python/calibra/_native.py (DTYPE_CODES); never renumber them.
#pragma once
#include <cstddef>
#include <cstdint>

namespace calibra {

enum class DType : int32_t {
  F32 = 0,
  F16 = 1,
  BF16 = 2,
  F64 = 3,
  U8 = 4,
  I8 = 5,
  I16 = 6,
  I32 = 7,
  I64 = 8,
  Bool = 9,
  F8E4M3 = 10,  // float8_e4m3fn bits, as NVFP4 scales are stored
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
    case DType::U8: return "uint8";
    case DType::I8: return "int8";
    case DType::I16: return "int16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::Bool: return "bool";
    case DType::F8E4M3: return "float8_e4m3fn";
  }
  return "unknown";
}

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    default: return 1;
  }
}

inline bool is_floating(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64;
}

}  // namespace calibra
