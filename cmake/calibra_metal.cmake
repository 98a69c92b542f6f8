# The Metal backend's build step (macOS with CALIBRA_METAL=ON only).
#
# Compiles metal/*.metal with Apple's toolchain (xcrun metal -> .air -> xcrun metallib) into
# calibra/kernels.metallib, installed in the wheel next to the sources. -fno-fast-math: calibra's
# integer outputs must equal the reference bit for bit, which needs IEEE division and no reassociation.
# At run time calibra._metal compiles the shipped sources with torch.mps.compile_shader (torch has no
# public API to load a prebuilt metallib into its MPS stream); building the metallib here makes Apple's
# compiler check every kernel when the wheel is built, so a source it rejects fails the build.
#
# NOT RUN YET: no Mac has executed this file (see README, "Metal backend: what was verified where").
find_program(CALIBRA_XCRUN xcrun REQUIRED)
set(_metal_dir "${PROJECT_SOURCE_DIR}/metal")
set(_metal_kernels hadamard quantize pack sparsity hessian w4a16 gptq)
set(_metal_headers "${_metal_dir}/kargs.h" "${_metal_dir}/calibra_common.h")
set(_metal_air "")
foreach(k IN LISTS _metal_kernels)
  set(_air "${CMAKE_CURRENT_BINARY_DIR}/metal/${k}.air")
  add_custom_command(
    OUTPUT "${_air}"
    COMMAND "${CMAKE_COMMAND}" -E make_directory "${CMAKE_CURRENT_BINARY_DIR}/metal"
    COMMAND "${CALIBRA_XCRUN}" -sdk macosx metal -std=metal3.0 -fno-fast-math -Wall -I "${_metal_dir}"
            -c "${_metal_dir}/${k}.metal" -o "${_air}"
    DEPENDS "${_metal_dir}/${k}.metal" ${_metal_headers}
    COMMENT "metal ${k}.metal"
    VERBATIM)
  list(APPEND _metal_air "${_air}")
endforeach()
set(_metallib "${CMAKE_CURRENT_BINARY_DIR}/kernels.metallib")
add_custom_command(
  OUTPUT "${_metallib}"
  COMMAND "${CALIBRA_XCRUN}" -sdk macosx metallib ${_metal_air} -o "${_metallib}"
  DEPENDS ${_metal_air}
  COMMENT "metallib calibra/kernels.metallib"
  VERBATIM)
add_custom_target(calibra_metallib ALL DEPENDS "${_metallib}")
install(FILES "${_metallib}" DESTINATION calibra)
if(CALIBRA_INPLACE_DIR)
  add_custom_command(TARGET calibra_metallib POST_BUILD
                     COMMAND "${CMAKE_COMMAND}" -E copy "${_metallib}" "${CALIBRA_INPLACE_DIR}/kernels.metallib")
endif()
