// Baseline-ISA build of the CPU channel kernels (at::vec's generic Vectorized): the one every
// CPU can run. See channel_cpu_kernels.h.
#define OBA_CHANNEL_ISA_LEVEL 0
#include "channel_cpu_kernels.h"
