// calibra::pack / calibra::unpack -- dense LSB-first bit packing of integer codes into words.
//
// Layout, per line along `dim` (each line is its own bit stream): element i occupies stream bits
// [i*bits, (i+1)*bits), least significant bit first; word k holds stream bits [k*wb, (k+1)*wb), with
// stream bit k*wb + j at bit j of the word (wb = 32 for int32 words, 8 for uint8 words). Codes of
// 3/5/6/7 bits straddle word boundaries. Trailing bits of the last word are zero. An int32 word is
// the uint32 bit pattern stored as int32.
#pragma once
#include "calibra/status.h"
#include "calibra/stream.h"
#include "calibra/tensor_arg.h"

namespace calibra {

struct PackParams {
  // codes: [R, C] uint8, any strides; every code < 2^bits (else kInvalidArgument naming the first
  //        offender in row-major order: "[pack] codes must be < 2**bits (found V at row r, col c)").
  // out:   contiguous int32 | uint8 (the word type), [R, ceil(C*bits/wb)] for dim 1,
  //        [ceil(R*bits/wb), C] for dim 0.
  TensorArg codes;
  TensorArg out;
  int64_t bits = 0;  // 1..8
  int64_t dim = 1;   // 0 or 1
  // CUDA only: int64 [1] holding INT64_MAX; the kernel atomically lowers it to the row-major index
  // (r*C + c) of the first code >= 2^bits. The CUDA entry point does not sync or read it back.
  TensorArg err;
};

struct UnpackParams {
  // words: int32 | uint8, any strides; [R, nw] for dim 1, [nw, C] for dim 0, nw = ceil(length*bits/wb).
  // out:   contiguous uint8, [R, length] for dim 1, [length, C] for dim 0.
  // Bits past the last code are ignored.
  TensorArg words;
  TensorArg out;
  int64_t bits = 0;
  int64_t dim = 1;
  int64_t length = 0;
};

Status pack_cpu(const PackParams& p);
Status unpack_cpu(const UnpackParams& p);
Status pack_cuda(const PackParams& p, cudaStream_t stream);
Status unpack_cuda(const UnpackParams& p, cudaStream_t stream);

}  // namespace calibra
