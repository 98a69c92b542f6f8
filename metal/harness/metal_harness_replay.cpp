// Replays launches recorded by tests/metal (CALIBRA_METAL_HARNESS_RECORD=dir) on the harness and
// checks every buffer against the recorded result. Exists for the ThreadSanitizer lane: a TSan
// runtime cannot be preloaded into python + torch, so the sanitized harness runs here instead, on the
// same launches the Python tests checked against the references.
// Usage: metal_harness_replay FILE.launch...   (exit 0 when every launch reproduces its result)
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

extern "C" int mh_launch(const char* name, void** buffers, int nbuf, unsigned gx, unsigned gy, unsigned gz, unsigned tx,
                         unsigned ty, unsigned tz, unsigned skew_us, char* err, int errlen);

int main(int argc, char** argv) {
  int failures = 0;
  for (int i = 1; i < argc; ++i) {
    std::ifstream f(argv[i], std::ios::binary);
    std::string header;
    std::getline(f, header);
    std::istringstream h(header);
    std::string kernel;
    unsigned g[3], t[3];
    int nbuf = 0;
    h >> kernel >> g[0] >> g[1] >> g[2] >> t[0] >> t[1] >> t[2] >> nbuf;
    std::vector<std::vector<unsigned char>> bufs(nbuf), want(nbuf);
    std::vector<void*> ptrs(nbuf);
    for (int b = 0; b < nbuf; ++b) {
      std::string line;
      std::getline(f, line);
      const size_t n = std::stoul(line);
      bufs[b].resize(n + 16);  // never a zero-sized buffer
      want[b].resize(n);
      f.read(reinterpret_cast<char*>(bufs[b].data()), static_cast<std::streamsize>(n));
      f.read(reinterpret_cast<char*>(want[b].data()), static_cast<std::streamsize>(n));
      ptrs[b] = bufs[b].data();
    }
    if (!f) {
      std::fprintf(stderr, "%s: truncated\n", argv[i]);
      return 2;
    }
    char err[512];
    if (mh_launch(kernel.c_str(), ptrs.data(), nbuf, g[0], g[1], g[2], t[0], t[1], t[2], 0, err, sizeof err)) {
      std::fprintf(stderr, "%s: %s\n", argv[i], err);
      ++failures;
      continue;
    }
    for (int b = 0; b < nbuf; ++b)
      for (size_t k = 0; k < want[b].size(); ++k)
        if (bufs[b][k] != want[b][k]) {
          std::fprintf(stderr, "%s (%s): buffer %d differs at byte %zu\n", argv[i], kernel.c_str(), b, k);
          ++failures;
          break;
        }
  }
  std::printf("replayed %d launches, %d failed\n", argc - 1, failures);
  return failures ? 1 : 0;
}
