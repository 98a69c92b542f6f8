// Argument conversions shared by the CPU and CUDA bindings of the quantize family.
#pragma once

#include <string>

#include "binding.h"
#include "calibra/params/quantize.h"

namespace calibra_bind {

inline calibra::Fp4Format fp4_format(const std::string& s) {
  calibra::Fp4Format f;
  if (!calibra::parse_fp4_format(s.c_str(), &f))
    throw py::value_error("[quantize] format must be 'mxfp4' or 'nvfp4', got '" + s + "'");
  return f;
}

}  // namespace calibra_bind
