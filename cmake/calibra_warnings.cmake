# Shared compile flags for the C++ kernels.
#  -ffp-contract=off: the kernels must round exactly like the pure-torch reference (integer codes are
#   compared bit for bit), so the compiler may not fuse a*b+c into one FMA behind our back.
#   Kernels that want FMA use it explicitly through intrinsics.
#  no -ffast-math anywhere, for the same reason (w / scale must stay a true division).
function(calibra_set_cxx_flags target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter -ffp-contract=off -fno-math-errno>)
  if(CALIBRA_WERROR)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
  endif()
endfunction()
