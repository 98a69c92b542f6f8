# CALIBRA_CUDA=AUTO (the default): build the CUDA backend where it can run -- an NVIDIA GPU is present and a
# CUDA compiler is found -- so a plain `pip install .` on a GPU machine gets calibra._cuda instead of silently
# running every op's pure-torch reference. The GPU is checked first (cheap) so a machine without one never
# pays for CMake's compiler probe. Sets CALIBRA_CUDA to ON or OFF and says why.
set(_calibra_gpu "")
find_program(CALIBRA_NVIDIA_SMI nvidia-smi)
if(CALIBRA_NVIDIA_SMI)
  execute_process(COMMAND "${CALIBRA_NVIDIA_SMI}" -L RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_QUIET
                  TIMEOUT 20)
  if(_rc EQUAL 0 AND _out MATCHES "GPU [0-9]+:")
    string(REGEX MATCH "GPU 0: [^(\n]*" _calibra_gpu "${_out}")
    string(STRIP "${_calibra_gpu}" _calibra_gpu)
  endif()
elseif(EXISTS "/dev/nvidia0")
  set(_calibra_gpu "/dev/nvidia0")
endif()
if(NOT _calibra_gpu)
  set(CALIBRA_CUDA OFF)
  message(STATUS "calibra: CALIBRA_CUDA=AUTO -> OFF (no NVIDIA GPU found); CALIBRA_CUDA=ON builds it anyway")
  return()
endif()
include(CheckLanguage)
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  set(CALIBRA_CUDA ON)
  message(STATUS "calibra: CALIBRA_CUDA=AUTO -> ON (${_calibra_gpu}, ${CMAKE_CUDA_COMPILER})")
else()
  set(CALIBRA_CUDA OFF)
  message(WARNING "calibra: an NVIDIA GPU is present (${_calibra_gpu}) but no CUDA compiler (nvcc) was found: "
                  "building without calibra._cuda, so every op on CUDA tensors runs its pure-torch reference. "
                  "Install the CUDA toolkit (or set CUDACXX / CMAKE_CUDA_COMPILER) and reinstall.")
endif()
