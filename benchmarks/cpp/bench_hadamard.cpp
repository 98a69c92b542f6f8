// Benchmark of calibra::hadamard on CPU (normalized blockwise Walsh-Hadamard transform). GB/s counts
// one read of x and one write of out. Usage: see CMakeLists.txt in this folder.
#include "bench_common.h"
#include "calibra/params/hadamard.h"

int main(int argc, char** argv) {
  using namespace calibra;
  const bench::Options o = bench::parse(argc, argv, "[--quick] [--repeat N] [--threads N]");
  struct Case { int64_t rows, n, block; };
  std::vector<Case> cases = {{512, 4096, -1}, {512, 4096, 128}, {512, 8192, -1}, {128, 14336, 64}};
  if (o.quick) cases = {{64, 1024, -1}};
  bench::header("hadamard, fp32", "| x | block | median µs | GB/s |\n|---|---|---|---|");
  for (const Case& c : cases) {
    std::vector<float> x = bench::randn<float>(static_cast<size_t>(c.rows * c.n), 2);
    std::vector<float> out(x.size());
    HadamardParams p{bench::contiguous(x.data(), DType::F32, {c.rows, c.n}),
                     bench::contiguous(out.data(), DType::F32, {c.rows, c.n}), c.block};
    Status st;
    const double us = bench::median_us(o, [&] { st = hadamard_cpu(p); });
    if (!st.ok()) { std::printf("error: %s\n", st.message.c_str()); return 1; }
    const double gbs = 2.0 * static_cast<double>(x.size() * sizeof(float)) / (us * 1e-6) / 1e9;
    std::printf("| %lldx%lld | %lld | %.0f | %.2f |\n", static_cast<long long>(c.rows), static_cast<long long>(c.n),
                static_cast<long long>(c.block == -1 ? c.n : c.block), us, gbs);
  }
  return 0;
}
