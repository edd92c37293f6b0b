// AVX2 + FMA build of the CPU channel kernels (4 float64 lanes), run only where the CPU has
// them and ATen's capability is AVX2 or better. See channel_cpu_kernels.h.
#include "channel_cpu.h"
#if OBA_CHANNEL_CPU_CLONES
#define OBA_CHANNEL_ISA_LEVEL 2
#include "channel_cpu_kernels.h"
#endif
