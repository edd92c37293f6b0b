// OBA_HD marks the arithmetic shared by the CUDA kernels and the CPU build: `__host__ __device__`
// under nvcc, nothing for the host compiler. Functions marked with it are the device code that
// CPU tests execute (see csrc/common/channel_kernel.h and csrc/cpu/channel_emulate.cpp).
#pragma once

#if defined(__CUDACC__)
#define OBA_HD __host__ __device__
#else
#define OBA_HD
#endif
