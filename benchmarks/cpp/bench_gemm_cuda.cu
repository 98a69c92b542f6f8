// C++ benchmark of calibra's CUDA inference GEMMs (w4a16_gemm_cuda, sparse24_gemm_cuda) without Python or
// the torch dispatcher: Llama-3-8B and Llama-2-70B layer shapes (../shared/TARGETS.md), batch 1..128;
// median µs over CUDA events, TFLOP/s (2MNK) and GB/s (weights + scales/metadata + x + y). Built only with
// -DCALIBRA_CUDA=ON -DCALIBRA_BENCHMARKS=ON. Ratios against cuBLAS are in benchmarks/bench_gemm.py (this
// binary does not link cuBLAS). Weight contents are arbitrary valid bit patterns: timing does not depend
// on the values (every metadata nibble is 0x4 = indices 0, 1, a valid 2:4 pattern).
//
//   build/bench/benchmarks/cpp/bench_gemm_cuda [--quick] [--repeat N]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "calibra/params/gemm.h"
#include "calibra/tensor_arg.h"
#include "tensor_args.h"

namespace {

#define CHECK_CUDA(expr)                                                                    \
  do {                                                                                      \
    cudaError_t e_ = (expr);                                                                \
    if (e_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s failed: %s\n", #expr, cudaGetErrorString(e_));               \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

void* device_fill(size_t bytes, unsigned char byte) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, bytes));
  CHECK_CUDA(cudaMemset(p, byte, bytes));
  return p;
}

template <class F>
double median_us(int repeat, F&& fn) {
  fn();
  fn();
  CHECK_CUDA(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<double> t;
  for (int i = 0; i < repeat; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    fn();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1e3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void check(const calibra::Status& st) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.message.c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  int repeat = 20;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--repeat") && i + 1 < argc) repeat = std::max(1, std::atoi(argv[++i]));
    else {
      std::printf("usage: %s [--quick] [--repeat N]\n", argv[0]);
      return std::strcmp(argv[i], "--help") ? 2 : 0;
    }
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("bench_gemm_cuda: no CUDA device here\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  struct Shape { const char* name; int64_t k, n; };
  std::vector<Shape> shapes = {{"llama3-8b qkv", 4096, 6144},    {"llama3-8b o", 4096, 4096},
                               {"llama3-8b gate_up", 4096, 28672}, {"llama3-8b down", 14336, 4096},
                               {"llama2-70b qkv", 8192, 10240},  {"llama2-70b o", 8192, 8192},
                               {"llama2-70b gate_up", 8192, 57344}, {"llama2-70b down", 28672, 8192}};
  std::vector<int64_t> batches = {1, 16, 32, 64, 128};
  if (quick) {
    shapes = {{"llama3-8b o", 4096, 4096}};
    batches = {1, 16};
  }
  std::printf("device: %s, %d SMs\n\n| layer | K x N | batch | W4A16 µs | W4A16 TFLOP/s | W4A16 GB/s | 2:4 µs | 2:4 TFLOP/s | 2:4 GB/s |\n"
              "|---|---|---|---|---|---|---|---|---|\n", prop.name, prop.multiProcessorCount);
  const int64_t max_m = 128;
  for (const Shape& s : shapes) {
    const int64_t K = s.k, N = s.n, G = K / 128;
    void* tiled = device_fill(static_cast<size_t>(K * N / 2), 0x5a);
    void* scales = device_fill(static_cast<size_t>(G * N * 2), 0x1c);  // 0x1c1c: a small positive fp16
    void* values = device_fill(static_cast<size_t>(N * K), 0x1c);
    void* meta = device_fill(static_cast<size_t>(N * K / 8), 0x44);
    void* x = device_fill(static_cast<size_t>(max_m * K * 2), 0x1c);
    void* y = device_fill(static_cast<size_t>(max_m * N * 2), 0);
    void* ws = device_fill(static_cast<size_t>(16 * max_m * N * 4), 0);
    for (int64_t m : batches) {
      calibra::W4A16GemmParams p;
      p.x = calibra::bench::contiguous(x, calibra::DType::F16, {m, K});
      p.tiled = calibra::bench::contiguous(tiled, calibra::DType::I32, {K / 16, 2 * N});
      p.scales = calibra::bench::contiguous(scales, calibra::DType::F16, {G, N});
      p.group = 128;
      p.out = calibra::bench::contiguous(y, calibra::DType::F16, {m, N});
      const int64_t s4 = calibra::gemm_split_k(m, N, K, prop.multiProcessorCount, calibra::kW4A16BlockN,
                                                 calibra::kW4A16MinRows);
      if (s4 > 1) p.workspace = calibra::bench::contiguous(ws, calibra::DType::F32, {s4, m, N});
      const double t4 = median_us(repeat, [&] { check(calibra::w4a16_gemm_cuda(p, nullptr)); });
      calibra::Sparse24GemmParams q;
      q.x = p.x;
      q.values = calibra::bench::contiguous(values, calibra::DType::F16, {N, K / 2});
      q.meta = calibra::bench::contiguous(meta, calibra::DType::I32, {N / 16, K / 2});
      q.out = p.out;
      const int64_t s24 = calibra::gemm_split_k(m, N, K, prop.multiProcessorCount, calibra::kSparse24BlockN,
                                                  calibra::kSparse24MinRows);
      if (s24 > 1) q.workspace = calibra::bench::contiguous(ws, calibra::DType::F32, {s24, m, N});
      const double t24 = median_us(repeat, [&] { check(calibra::sparse24_gemm_cuda(q, nullptr)); });
      const double flop = 2.0 * m * N * K, io = 2.0 * m * (K + N);
      std::printf("| %s | %lldx%lld | %lld | %.1f | %.1f | %.0f | %.1f | %.1f | %.0f |\n", s.name, static_cast<long long>(K),
                  static_cast<long long>(N), static_cast<long long>(m), t4, flop / t4 / 1e6,
                  (K * N / 2.0 + G * N * 2.0 + io) / t4 / 1e3, t24, flop / t24 / 1e6, (N * K + N * K / 8.0 + io) / t24 / 1e3);
    }
    for (void* ptr : {tiled, scales, values, meta, x, y, ws}) cudaFree(ptr);
  }
  return 0;
}
