// The CUDA stream type, declared without including any CUDA header so that params structs stay
// includable from plain C++ (this is exactly how cuda_runtime_api.h declares it).
#pragma once
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
