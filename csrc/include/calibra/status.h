// Status: every native entry point returns one. Kernels never throw and never abort; the binding turns
// a non-ok Status into a Python exception (ValueError for bad arguments or data, NotImplementedError
// for unsupported cases, RuntimeError for device errors).
#pragma once
#include <cstdarg>
#include <cstdio>
#include <string>

namespace calibra {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // wrong dtype, rank, shape, or a value out of range
  kNonFinite = 2,        // NaN/Inf found in data that must be finite
  kUnsupported = 3,      // a valid request this backend does not implement
  kDeviceError = 4,      // CUDA/Metal runtime error
};

struct Status {
  StatusCode code = StatusCode::kOk;
  std::string message;

  bool ok() const { return code == StatusCode::kOk; }
  static Status Ok() { return Status{}; }
};

// Status with a printf-style message. By convention the message starts with "[op] ".
inline Status make_status(StatusCode code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
inline Status make_status(StatusCode code, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return Status{code, std::string(buf)};
}

#define CALIBRA_RETURN_IF_ERROR(expr)          \
  do {                                         \
    ::calibra::Status _calibra_st = (expr);    \
    if (!_calibra_st.ok()) return _calibra_st; \
  } while (0)

}  // namespace calibra
