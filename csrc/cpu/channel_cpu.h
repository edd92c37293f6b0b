// Interface between csrc/cpu/channel.cpp (chunking, threads, combine order, outputs) and the
// per-ISA builds of its two hot loop nests (csrc/cpu/channel_cpu_kernels.h, compiled once per
// ISA by channel_isa_default.cpp and channel_isa_avx2.cpp). See channel_cpu_kernels.h for why
// and how.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../common/params.h"

// The x86-64 AVX2 build needs GCC's `#pragma GCC target` (clang ignores it for
// functions defined in headers, MSVC has no equivalent): elsewhere only the baseline build exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define OBA_CHANNEL_CPU_CLONES 1
#else
#define OBA_CHANNEL_CPU_CLONES 0
#endif

namespace oba_ext {

// (common/channel_kernel.h; not included here: channel_cpu_kernels.h must include it after it
// switches the target ISA, so that its templates are compiled for that ISA.)
template <bool HAS_B, bool HAS_C, bool SECOND>
struct ChannelTerms;

// The two task kernels of one (ISA, input dtype, terms), float64 sums:
//   rows: layout (outer, C, inner), rows [o0, o1) of channels [k0, k1): adds Σ_o Σ_i of the terms
//         of channel k to s2[k - k0], s1[k - k0];
//   cols: layout (M, C) with C innermost, rows [m0, m1): adds Σ_m of the terms of channel k to
//         x[k] (second), y[k] (first), row by row in order of m.
// lanes: float64 lanes per SIMD vector (the rows kernel's reduction order depends on it).
template <typename scalar_t>
struct ChannelCpuTasks {
  void (*rows)(const ChannelReduceParams<scalar_t>& p, int64_t o0, int64_t o1, int64_t k0,
               int64_t k1, double* s2, double* s1);
  void (*cols)(const ChannelReduceParams<scalar_t>& p, int64_t m0, int64_t m1, double* x,
               double* y);
  int64_t lanes;
};

// channel_cpu_tasks<Terms, scalar_t>() of each build, explicitly instantiated in its .cpp for the
// four input dtypes and the five ChannelTerms of dispatch_channel_terms (common/channel.h).
#define OBA_CHANNEL_CPU_DECLARE(isa)                 \
  namespace isa {                                    \
  template <typename Terms, typename scalar_t>       \
  ChannelCpuTasks<scalar_t> channel_cpu_tasks();     \
  }
OBA_CHANNEL_CPU_DECLARE(cpu_default)
#if OBA_CHANNEL_CPU_CLONES
OBA_CHANNEL_CPU_DECLARE(cpu_avx2)
#endif

}  // namespace oba_ext
