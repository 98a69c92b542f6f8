// Benchmark of calibra::hessian_accumulate on CPU (H += X^T X). GFLOP/s counts the full 2*N*d^2
// flops of X^T X (as a GEMM would), although the kernel computes only the lower triangle (about half),
// so the number compares directly with a GEMM's. Usage: see CMakeLists.txt in this folder.
#include "bench_common.h"
#include "calibra/params/hessian.h"

int main(int argc, char** argv) {
  using namespace calibra;
  const bench::Options o = bench::parse(argc, argv, "[--quick] [--repeat N] [--threads N]");
  struct Case { int64_t n, d; };
  std::vector<Case> cases = {{2048, 4096}, {2048, 1024}, {512, 4096}};
  if (o.quick) cases = {{256, 512}};
  bench::header((std::string("hessian_accumulate, fp32 x, micro-kernel ") + hessian_accumulate_cpu_isa()).c_str(),
                "| x | H | median µs | GFLOP/s (2·N·d²) |\n|---|---|---|---|");
  for (const Case& c : cases) {
    std::vector<float> x = bench::randn<float>(static_cast<size_t>(c.n * c.d), 1);
    for (DType hd : {DType::F32, DType::F64}) {
      std::vector<double> h64;
      std::vector<float> h32;
      void* hp;
      if (hd == DType::F32) { h32.assign(static_cast<size_t>(c.d * c.d), 0.0f); hp = h32.data(); }
      else { h64.assign(static_cast<size_t>(c.d * c.d), 0.0); hp = h64.data(); }
      HessianParams p{bench::contiguous(hp, hd, {c.d, c.d}), bench::contiguous(x.data(), DType::F32, {c.n, c.d})};
      Status st;
      const double us = bench::median_us(o, [&] { st = hessian_accumulate_cpu(p); });
      if (!st.ok()) { std::printf("error: %s\n", st.message.c_str()); return 1; }
      const double gflops = 2.0 * c.n * c.d * c.d / (us * 1e-6) / 1e9;
      std::printf("| %lldx%lld | %s | %.0f | %.1f |\n", static_cast<long long>(c.n), static_cast<long long>(c.d),
                  dtype_name(hd), us, gflops);
    }
  }
  return 0;
}
