# CUDA toolchain for calibra._cuda: architectures 80 (A100) and 90a (H100/H200, wgmma), static runtime,
# so the module needs only the driver (libcuda) at run time and never the CUDA toolkit or libtorch.
# 80-virtual embeds compute_80 PTX beside the two cubins: a newer GPU (Blackwell sm_100/sm_120) has no
# cubin here, and the driver JIT-compiles that PTX for it instead of failing with "no kernel image"
# (90a code is architecture-specific and cannot run there; its PTX would not help).
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES 80-real 90a-real 80-virtual)
endif()
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
find_package(CUDAToolkit REQUIRED)
function(calibra_set_cuda_flags target)
  # --fmad=false: same reason as -ffp-contract=off on the CPU; exact codes must match the reference.
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--fmad=false -lineinfo --expt-relaxed-constexpr -Xptxas=-warn-spills,-warn-lmem-usage>)
  if(CALIBRA_WERROR)
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xptxas=-Werror -Xcompiler=-Wall,-Werror>)
  endif()
endfunction()
