// The two hot loop nests of the CPU channel reduction (csrc/cpu/channel.cpp), written with
// ATen's at::vec::Vectorized<double> and compiled once per ISA: channel_isa_default.cpp and
// channel_isa_avx2.cpp each set OBA_CHANNEL_ISA_LEVEL and include this header (its only
// includers).
//
// Why this way. ATen's own per-ISA kernels (DispatchStub) are built by its CMake, which compiles
// each kernel file once per CPU_CAPABILITY with -mavx2 -mfma / -mavx512*; setuptools cannot give
// one source file its own flags. So each ISA build is its own small translation unit that
// switches the target with `#pragma GCC target` before it includes <ATen/cpu/vec/vec.h>, with
// CPU_CAPABILITY / CPU_CAPABILITY_<ISA> defined as ATen's build defines them: at::vec then gives
// the AVX2 Vectorized<double> (4 float64 lanes, __m256d) in the inline namespace
// at::vec::AVX2, and everything of ours lives in oba_ext::cpu_avx2 (the loaders are types of this
// file, so every template instance built here names one). So no inline function or template
// instance of one build can be picked by the linker for another: the headers vec.h and
// channel_kernel.h depend on are included BEFORE the target switch (their inline functions stay
// baseline code), and tests/test_channel_cpu_vec.py checks the AVX2 object defines no symbol
// outside its namespaces. channel.cpp picks the build at run time from at::get_cpu_capability()
// (which honours ATEN_CPU_CAPABILITY) and __builtin_cpu_supports. The baseline build (level 0)
// is at::vec's generic Vectorized (4 float64 lanes as arrays, which GCC vectorises for SSE2).
//
// Measured (one thread, thread CPU time, min of 3 interleaved runs of 9-40 calls on a shared
// 2-core AVX-512 Xeon; a, b, c, d all given; ms):
//   input    layout        shape           before*  baseline  AVX2   AVX-512  ATen mul+sum
//   float32  NCHW          32x64x56x56      9.69    10.23     4.89   5.14     24.2
//   float32  NCHW          64x256x16x16     6.34     6.67     2.83   2.59     13.4
//   float32  NCHW          32x256x4x4       0.194    0.217    0.078  0.105     0.350
//   float32  channels-last 64x256x16x16     3.88     5.76     3.66   3.38     13.9
//   float32  tokens        32x197x768       4.59     6.77     4.48   4.40     17.5
//   float64  NCHW          32x64x56x56     19.6     13.9      9.44   9.22    136
//   float64  channels-last 64x256x16x16     6.94     7.81     6.58   6.26     79.8
//   float64  tokens        32x197x768       8.05     9.06     8.15   7.50    105
// (*before: plain C++ loops, compiled twice, baseline and target("avx2,fma").) The AVX2 build is
// 1.3-2x faster than the baseline one, so the run-time dispatch pays; an AVX-512 build (8 lanes,
// tried) was within +-10% of AVX2 (memory-bound) and 1.3x slower on 4x4 maps, so there is none:
// AVX512 capability runs the AVX2 build. ATen's elementwise products + sums are 4-14x slower
// (they write the products to memory), so no path uses them.
//
// Arithmetic: the terms are channel_terms (common/channel_kernel.h), the same expression as the
// CUDA kernels and the scalar tails, with every input widened to float64 before any product
// (exact for float32/float16/bfloat16) and float64 sums. The order of the additions depends on
// the shape and on `lanes` only, never on threads (channel.cpp fixes the chunking).
#pragma once

#if !defined(OBA_CHANNEL_ISA_LEVEL)
#error "channel_cpu_kernels.h: define OBA_CHANNEL_ISA_LEVEL (0 baseline, 2 AVX2)"
#endif

// What vec.h and common/channel_kernel.h include, compiled for the baseline ISA (see above).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/NumericUtils.h>
#include <ATen/cpu/vec/intrinsics.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/complex.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include "channel_cpu.h"

#if OBA_CHANNEL_ISA_LEVEL == 0
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define OBA_CHANNEL_ISA_NS cpu_default
#elif OBA_CHANNEL_ISA_LEVEL == 2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define OBA_CHANNEL_ISA_NS cpu_avx2
#else
#error "channel_cpu_kernels.h: unknown OBA_CHANNEL_ISA_LEVEL"
#endif

// sleef.h (included by vec.h) declares its __m256 / __m256d functions, which at::vec's AVX2
// Vectorized<float/double> members name, only under __AVX__, and GCC's target pragma does not
// define the ISA macros as -mavx2 would: define them for that one header.
#if OBA_CHANNEL_ISA_LEVEL == 2 && !defined(__AVX__)
#define __AVX__ 1
#define __AVX2__ 1
#define OBA_UNDEF_AVX_MACROS
#endif
#define SLEEF_STATIC_LIBS
#include <sleef.h>
#ifdef OBA_UNDEF_AVX_MACROS
#undef __AVX__
#undef __AVX2__
#undef OBA_UNDEF_AVX_MACROS
#endif

#pragma GCC diagnostic push
// vec.h's BFloat16/Half lambdas (unused here) return vectors; GCC notes the ABI of that.
#pragma GCC diagnostic ignored "-Wpsabi"
// ...and uses `#pragma unroll`, which GCC does not know (GCC < 13 warns despite this line).
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop

// After the switch: channel_terms (a template) is then compiled for this ISA where it is
// instantiated with this file's loaders, and can inline at::vec's operators.
#include "../common/channel_kernel.h"

namespace oba_ext {
namespace OBA_CHANNEL_ISA_NS {
namespace {

using Vec = at::vec::Vectorized<double>;
constexpr int64_t kLanes = Vec::size();

// The ISA build is the one asked for (vec.h was not included earlier without the defines).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#if OBA_CHANNEL_ISA_LEVEL == 2
static_assert(std::is_convertible_v<Vec, __m256d>, "at::vec gave no AVX2 Vectorized<double>");
#endif
#pragma GCC diagnostic pop

// Reads one input widened to float64. (A type of this file: every template instance built here
// names a type of this build, so none can be merged with another build's by the linker.)
struct ScalarLoad {
  template <typename scalar_t>
  double operator()(const scalar_t* x, int64_t idx) const {
    return static_cast<double>(x[idx]);
  }
};

// Reads kLanes consecutive inputs widened to float64 (exact).
struct VecLoad {
  template <typename scalar_t>
  Vec operator()(const scalar_t* x, int64_t idx) const {
    if constexpr (std::is_same_v<scalar_t, double>) {
      return Vec::loadu(x + idx);
    } else {
      __at_align__ double w[kLanes];
      for (int64_t u = 0; u < kLanes; ++u) w[u] = static_cast<double>(x[idx + u]);
      return Vec::loadu(w);
    }
  }
};

// Σ of the lanes of v, in lane order.
inline double lane_sum(const Vec& v) {
  __at_align__ double w[kLanes];
  v.store(w);
  double s = 0.0;
  for (int64_t u = 0; u < kLanes; ++u) s += w[u];
  return s;
}

// Layout (outer, C, inner). Each contiguous span of `inner` elements (one (o, k)) is summed in
// two vector accumulators (even / odd vector of each pair), then a remaining vector into the
// first, (acc0 + acc1) lane by lane in lane order, then the scalar tail.
template <typename Terms, typename scalar_t>
void rows_task(const ChannelReduceParams<scalar_t>& p, int64_t o0, int64_t o1, int64_t k0,
               int64_t k1, double* s2, double* s1) {
  const int64_t n = p.inner;
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t base = (o * p.channels + k) * n;
      Vec x0(0.0), x1(0.0), y0(0.0), y1(0.0);
      int64_t i = 0;
      for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
        channel_terms<Terms>(p, base + i, VecLoad{}, x0, y0);
        channel_terms<Terms>(p, base + i + kLanes, VecLoad{}, x1, y1);
      }
      if (i + kLanes <= n) {
        channel_terms<Terms>(p, base + i, VecLoad{}, x0, y0);
        i += kLanes;
      }
      double sx = lane_sum(x0 + x1), sy = lane_sum(y0 + y1);
      for (; i < n; ++i) channel_terms<Terms>(p, base + i, ScalarLoad{}, sx, sy);
      s2[k - k0] += sx;
      s1[k - k0] += sy;
    }
  }
}

// Layout (M, C), C innermost: row by row (sequential memory), each vector of channels added to
// its accumulators x[k..], y[k..] (L1-resident), so every channel's sum runs over m0, ..., m1 - 1
// in order, as the scalar loop would. (Measured: adding blocks of 2, 4 or 8 rows per accumulator
// load/store was no faster here, 8 rows up to 2x slower; this path runs at memory bandwidth.)
template <typename Terms, typename scalar_t>
void cols_task(const ChannelReduceParams<scalar_t>& p, int64_t m0, int64_t m1, double* x,
               double* y) {
  const int64_t C = p.channels;
  for (int64_t m = m0; m < m1; ++m) {
    int64_t k = 0;
    for (; k + kLanes <= C; k += kLanes) {
      Vec sx = Vec::loadu(x + k), sy = Vec::loadu(y + k);
      channel_terms<Terms>(p, m * C + k, VecLoad{}, sx, sy);
      sx.store(x + k);
      sy.store(y + k);
    }
    for (; k < C; ++k) channel_terms<Terms>(p, m * C + k, ScalarLoad{}, x[k], y[k]);
  }
}

}  // namespace

template <typename Terms, typename scalar_t>
ChannelCpuTasks<scalar_t> channel_cpu_tasks() {
  return {&rows_task<Terms, scalar_t>, &cols_task<Terms, scalar_t>, kLanes};
}

#define OBA_CHANNEL_CPU_INSTANTIATE_TERMS(T)                                     \
  template ChannelCpuTasks<T> channel_cpu_tasks<ChannelTerms<false, false, false>, T>(); \
  template ChannelCpuTasks<T> channel_cpu_tasks<ChannelTerms<true, true, true>, T>();    \
  template ChannelCpuTasks<T> channel_cpu_tasks<ChannelTerms<true, false, true>, T>();   \
  template ChannelCpuTasks<T> channel_cpu_tasks<ChannelTerms<false, true, true>, T>();   \
  template ChannelCpuTasks<T> channel_cpu_tasks<ChannelTerms<false, false, true>, T>();
OBA_CHANNEL_CPU_INSTANTIATE_TERMS(float)
OBA_CHANNEL_CPU_INSTANTIATE_TERMS(double)
OBA_CHANNEL_CPU_INSTANTIATE_TERMS(c10::Half)
OBA_CHANNEL_CPU_INSTANTIATE_TERMS(c10::BFloat16)
#undef OBA_CHANNEL_CPU_INSTANTIATE_TERMS

}  // namespace OBA_CHANNEL_ISA_NS
}  // namespace oba_ext

#if OBA_CHANNEL_ISA_LEVEL != 0
#pragma GCC pop_options
#endif
