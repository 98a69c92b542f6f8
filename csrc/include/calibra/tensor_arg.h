// TensorArg: how a tensor crosses into native code. A raw pointer, shape and strides (in elements)
// and a dtype code; no torch type ever appears below the binding, so the native modules never link
// libtorch and one wheel serves any torch >= 2.4.
#pragma once
#include <cstdint>

#include "calibra/dtype.h"

namespace calibra {

constexpr int kMaxDims = 8;

struct TensorArg {
  void* data = nullptr;
  DType dtype = DType::F32;
  int32_t ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, as torch reports them

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  // Negative dimensions count from the end, as in Python.
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }

  bool is_contiguous() const {
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  // Rows x cols view of a tensor whose leading dims can be merged into one (the last dim may be strided).
  // True when every leading dim steps evenly, so row r starts at data + r * row_stride().
  bool leading_dims_mergeable() const {
    for (int i = ndim - 2; i > 0; --i) {
      if (shape[i] != 1 && shape[i - 1] != 1 && strides[i - 1] != strides[i] * shape[i]) return false;
    }
    return true;
  }
  int64_t rows() const {
    int64_t n = 1;
    for (int i = 0; i < ndim - 1; ++i) n *= shape[i];
    return n;
  }
  int64_t row_stride() const {
    // stride of the innermost non-unit leading dim (any value works when rows() <= 1)
    for (int i = ndim - 2; i >= 0; --i)
      if (shape[i] != 1) return strides[i];
    return ndim >= 1 ? shape[ndim - 1] : 1;
  }

  // Element offset of the first element of row r, where rows are all dims but the last
  // (works for any strides, merged or not).
  int64_t row_offset(int64_t r) const {
    int64_t off = 0;
    for (int i = ndim - 2; i >= 0; --i) {
      off += (r % shape[i]) * strides[i];
      r /= shape[i];
    }
    return off;
  }

  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

}  // namespace calibra
