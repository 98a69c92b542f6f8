// Benchmark of calibra's quantize family on CPU: quantize_int (int4 g128 sym/asym, int8 per channel),
// quantize_fp4 (mxfp4, nvfp4), and quantize_int followed by pack (the GPTQ / compressed-tensors
// export path). GB/s counts the bytes of w read plus every output written. Usage: see CMakeLists.txt.
#include "bench_common.h"
#include "calibra/params/pack.h"
#include "calibra/params/quantize.h"

int main(int argc, char** argv) {
  using namespace calibra;
  const bench::Options o = bench::parse(argc, argv, "[--quick] [--repeat N] [--threads N]");
  std::vector<std::pair<int64_t, int64_t>> shapes = {{4096, 4096}, {14336, 4096}};
  if (o.quick) shapes = {{1024, 1024}};
  bench::header("quantize, fp32 weights", "| case | w | median µs | GB/s |\n|---|---|---|---|");
  for (auto [out, in] : shapes) {
    const size_t n = static_cast<size_t>(out * in);
    std::vector<float> w = bench::randn<float>(n, 3);
    std::vector<uint8_t> codes(n);
    const TensorArg wa = bench::contiguous(w.data(), DType::F32, {out, in});
    const TensorArg ca = bench::contiguous(codes.data(), DType::U8, {out, in});
    auto report = [&](const char* name, double us, double bytes) {
      std::printf("| %s | %lldx%lld | %.0f | %.2f |\n", name, static_cast<long long>(out), static_cast<long long>(in), us,
                  bytes / (us * 1e-6) / 1e9);
    };
    struct IntCase { const char* name; int64_t bits, group; bool sym; };
    for (const IntCase& c : {IntCase{"int4 g128 sym", 4, 128, true}, IntCase{"int4 g128 asym", 4, 128, false},
                             IntCase{"int8 per-channel", 8, -1, true}}) {
      const int64_t groups = c.group == -1 ? 1 : in / c.group;
      std::vector<float> scales(static_cast<size_t>(out * groups));
      std::vector<uint8_t> zeros(scales.size());
      QuantizeIntParams p{wa, ca, bench::contiguous(scales.data(), DType::F32, {out, groups}),
                          bench::contiguous(zeros.data(), DType::U8, {out, groups}), c.bits, c.group, c.sym, {}};
      Status st;
      const double us = bench::median_us(o, [&] { st = quantize_int_cpu(p); });
      if (!st.ok()) { std::printf("error: %s\n", st.message.c_str()); return 1; }
      report(c.name, us, static_cast<double>(n * 4 + n + scales.size() * 5));
      if (c.bits == 4 && c.sym) {  // + pack into int32 words along the input dim
        std::vector<int32_t> words(static_cast<size_t>(out * in / 8));
        PackParams pk{ca, bench::contiguous(words.data(), DType::I32, {out, in / 8}), 4, 1, {}};
        const double us2 = bench::median_us(o, [&] {
          st = quantize_int_cpu(p);
          if (st.ok()) st = pack_cpu(pk);
        });
        if (!st.ok()) { std::printf("error: %s\n", st.message.c_str()); return 1; }
        report("int4 g128 sym + pack", us2, static_cast<double>(n * 4 + words.size() * 4 + scales.size() * 5));
      }
    }
    for (Fp4Format f : {Fp4Format::kMxfp4, Fp4Format::kNvfp4}) {
      const int64_t gs = f == Fp4Format::kMxfp4 ? 32 : 16;
      std::vector<uint8_t> scales(static_cast<size_t>(out * in / gs));
      float global = 0.0f;
      QuantizeFp4Params p{wa, ca, bench::contiguous(scales.data(), f == Fp4Format::kMxfp4 ? DType::U8 : DType::F8E4M3, {out, in / gs}),
                          bench::contiguous(&global, DType::F32, {1}), f, {}};
      Status st;
      const double us = bench::median_us(o, [&] { st = quantize_fp4_cpu(p); });
      if (!st.ok()) { std::printf("error: %s\n", st.message.c_str()); return 1; }
      report(f == Fp4Format::kMxfp4 ? "mxfp4" : "nvfp4", us, static_cast<double>(n * 4 + n + scales.size()));
    }
  }
  return 0;
}
