// The harness's view of each kernel: how a launch's buffers (in [[buffer(n)]] order, as the Metal
// host binds them) and the thread's position map onto the kernel's parameters. One line per
// kernel; this is the CPU stand-in for MTLComputeCommandEncoder::setBuffer + dispatch.
#pragma once
#include <functional>
#include <map>
#include <string>

#include "run_kernel.h"

namespace mh {
using Entry = std::function<void(void** b, const Pos& p)>;
std::map<std::string, Entry>& table();
struct Register {
  Register(const char* name, Entry e) { table()[name] = std::move(e); }
};
}  // namespace mh
