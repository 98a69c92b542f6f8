// calibra._cuda module-level functions shared by every family.
#include <cuda_runtime_api.h>

#include "binding.h"

CALIBRA_BINDINGS(cuda_common) {
  m.def("device_count", [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no driver" error
      return 0;
    }
    return n;
  });
}
