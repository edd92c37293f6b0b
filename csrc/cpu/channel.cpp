// CPU kernels of channel_score_reduce(_add_) and channel_first_order_reduce (SPEC §5 structured
// scores):
//   second[k] = Σ a⊙(b − d) + c⊙d  (b, c None = 0),   first[k] = Σ a⊙d,
// summed over every dim but channel_dim. The per-element terms are the device code's
// (channel_element in common/channel_kernel.h) with acc_t = float64: every input is converted to
// float64 before any product, and sums accumulate in float64. Deterministic: the work is cut
// into a fixed number of chunks that depends on the shape only (not on the thread count), and the
// chunk partials are added in chunk order.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/channel.h"
#include "../common/channel_kernel.h"
#include "../common/dispatch.h"
#include "../common/params.h"

namespace oba_ext {
namespace {

constexpr int64_t kTaskElems = int64_t(1) << 15;  // elements per task (~128 KiB of fp32 per input)
constexpr int64_t kMaxChunks = 64;

struct Chunking {
  int64_t rows_per_chunk;
  int64_t chunks;
};

// Splits `rows` rows of `row_elems` elements into at most kMaxChunks chunks of ~kTaskElems.
Chunking chunk_rows(int64_t rows, int64_t row_elems) {
  int64_t per = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, row_elems));
  int64_t chunks = (rows + per - 1) / per;
  if (chunks > kMaxChunks) {
    chunks = kMaxChunks;
    per = (rows + chunks - 1) / chunks;
    chunks = (rows + per - 1) / per;
  }
  return {per, std::max<int64_t>(chunks, 1)};
}

// ---- vectorisation and runtime ISA dispatch ----------------------------------------------------
// The two hot loop nests (one task of each layout) are plain C++ loops written for the compiler's
// vectoriser: independent float64 lanes over contiguous memory, no branches. They are compiled
// twice on x86-64 with GCC/Clang: for the baseline ISA (SSE2: 2 float64 per vector) and with
// target("avx2,fma") (4 per vector, FMA contraction), and the AVX2 build runs when ATen's CPU
// capability is AVX2 or better — so ATEN_CPU_CAPABILITY=default selects the baseline build,
// as it does for ATen's own kernels. Other platforms get the baseline build only.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define OBA_CPU_AVX2_CLONE 1
#define OBA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define OBA_CPU_AVX2_CLONE 0
#endif
#if defined(__GNUC__) || defined(__clang__)
#define OBA_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define OBA_ALWAYS_INLINE inline
#endif

bool use_avx2() {
#if OBA_CPU_AVX2_CLONE
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return avx2;
#else
  return false;
#endif
}

// Σ over one contiguous span of n elements with kLanes independent float64 accumulators (the
// lane loop vectorises; the order is fixed so the result is reproducible).
constexpr int kLanes = 8;

template <typename Terms, typename scalar_t>
OBA_ALWAYS_INLINE void span_sums(const ChannelReduceParams<scalar_t>& p, int64_t base, int64_t n,
                                 double& second, double& first) {
  double x[kLanes] = {0}, y[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 8
    for (int u = 0; u < kLanes; ++u) channel_element<Terms>(p, base + i + u, x[u], y[u]);
  }
  double sx = 0.0, sy = 0.0;
  for (int u = 0; u < kLanes; ++u) {
    sx += x[u];
    sy += y[u];
  }
  for (; i < n; ++i) channel_element<Terms>(p, base + i, sx, sy);
  second += sx;
  first += sy;
}

// One task of layout (outer, C, inner): rows [o0, o1) of channels [k0, k1), added to
// s2[k - k0], s1[k - k0].
template <typename Terms, typename scalar_t>
OBA_ALWAYS_INLINE void rows_task_body(const ChannelReduceParams<scalar_t>& p, int64_t o0,
                                      int64_t o1, int64_t k0, int64_t k1, double* s2,
                                      double* s1) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t k = k0; k < k1; ++k) {
      span_sums<Terms>(p, (o * p.channels + k) * p.inner, p.inner, s2[k - k0], s1[k - k0]);
    }
  }
}

// One task of layout (M, C): rows [m0, m1), added to the per-channel vectors x, y (the inner
// loop runs over contiguous channels).
template <typename Terms, typename scalar_t>
OBA_ALWAYS_INLINE void cols_task_body(const ChannelReduceParams<scalar_t>& p, int64_t m0,
                                      int64_t m1, double* __restrict__ x, double* __restrict__ y) {
  const int64_t C = p.channels;
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t row = m * C;
    for (int64_t k = 0; k < C; ++k) channel_element<Terms>(p, row + k, x[k], y[k]);
  }
}

template <typename Terms, typename scalar_t>
struct ChannelTasks {
  using RowsFn = void (*)(const ChannelReduceParams<scalar_t>&, int64_t, int64_t, int64_t,
                          int64_t, double*, double*);
  using ColsFn = void (*)(const ChannelReduceParams<scalar_t>&, int64_t, int64_t, double*,
                          double*);
  static void rows_base(const ChannelReduceParams<scalar_t>& p, int64_t o0, int64_t o1,
                        int64_t k0, int64_t k1, double* s2, double* s1) {
    rows_task_body<Terms>(p, o0, o1, k0, k1, s2, s1);
  }
  static void cols_base(const ChannelReduceParams<scalar_t>& p, int64_t m0, int64_t m1,
                        double* x, double* y) {
    cols_task_body<Terms>(p, m0, m1, x, y);
  }
#if OBA_CPU_AVX2_CLONE
  OBA_TARGET_AVX2 static void rows_avx2(const ChannelReduceParams<scalar_t>& p, int64_t o0,
                                        int64_t o1, int64_t k0, int64_t k1, double* s2,
                                        double* s1) {
    rows_task_body<Terms>(p, o0, o1, k0, k1, s2, s1);
  }
  OBA_TARGET_AVX2 static void cols_avx2(const ChannelReduceParams<scalar_t>& p, int64_t m0,
                                        int64_t m1, double* x, double* y) {
    cols_task_body<Terms>(p, m0, m1, x, y);
  }
  static RowsFn rows() { return use_avx2() ? &rows_avx2 : &rows_base; }
  static ColsFn cols() { return use_avx2() ? &cols_avx2 : &cols_base; }
#else
  static RowsFn rows() { return &rows_base; }
  static ColsFn cols() { return &cols_base; }
#endif
};

// Layout (outer, C, inner). Task (row chunk j, channel block q) streams rows [o0, o1) of the
// contiguous channel block [k0, k1) — sequential memory, ~kTaskElems per task — so both a
// large `outer` and a large `C` give parallel work. partial[(j*C + k)*2 + {0: second, 1: first}].
// (Measured on (64, 256, 16, 16) fp32: one task per channel, striding over rows, ran at half
// the bandwidth of this order.)
template <typename Terms, typename scalar_t>
std::vector<double> reduce_rows(const ChannelReduceParams<scalar_t>& p) {
  const int64_t C = p.channels, inner = p.inner;
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(C, kTaskElems / std::max<int64_t>(1, inner)));
  const int64_t nblocks = (C + block - 1) / block;
  const Chunking ch = chunk_rows(p.outer, block * inner);
  const auto task = ChannelTasks<Terms, scalar_t>::rows();
  std::vector<double> partial(static_cast<size_t>(ch.chunks * C * 2));  // every entry written
  at::parallel_for(0, ch.chunks * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> s2(block), s1(block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / nblocks, q = t % nblocks;
      const int64_t k0 = q * block, k1 = std::min(C, k0 + block);
      const int64_t o0 = j * ch.rows_per_chunk, o1 = std::min(p.outer, o0 + ch.rows_per_chunk);
      std::fill(s2.begin(), s2.end(), 0.0);
      std::fill(s1.begin(), s1.end(), 0.0);
      task(p, o0, o1, k0, k1, s2.data(), s1.data());
      for (int64_t k = k0; k < k1; ++k) {
        partial[(j * C + k) * 2] = s2[k - k0];
        partial[(j * C + k) * 2 + 1] = s1[k - k0];
      }
    }
  });
  return partial;
}

// Layout (M, C) with C innermost: chunk j sums its rows into per-channel vectors.
// partial[(j*C + k)*2 + {0, 1}].
template <typename Terms, typename scalar_t>
std::vector<double> reduce_cols(const ChannelReduceParams<scalar_t>& p) {
  const int64_t C = p.channels, M = p.outer;
  const Chunking ch = chunk_rows(M, C);
  const auto task = ChannelTasks<Terms, scalar_t>::cols();
  std::vector<double> partial(static_cast<size_t>(ch.chunks * C * 2));  // every entry written
  at::parallel_for(0, ch.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> s2(C), s1(C);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(s2.begin(), s2.end(), 0.0);
      std::fill(s1.begin(), s1.end(), 0.0);
      const int64_t m0 = j * ch.rows_per_chunk, m1 = std::min(M, m0 + ch.rows_per_chunk);
      task(p, m0, m1, s2.data(), s1.data());
      for (int64_t k = 0; k < C; ++k) {
        partial[(j * C + k) * 2] = s2[k];
        partial[(j * C + k) * 2 + 1] = s1[k];
      }
    }
  });
  return partial;
}

// Adds the chunk partials of each channel in chunk order and writes (or adds to) the outputs.
template <bool SECOND, typename out_t>
void write_out(const std::vector<double>& partial, int64_t C, const ChannelOutParams<out_t>& out) {
  const int64_t chunks = static_cast<int64_t>(partial.size()) / (2 * C);
  for (int64_t k = 0; k < C; ++k) {
    double s2 = 0.0, s1 = 0.0;
    for (int64_t j = 0; j < chunks; ++j) {
      s2 += partial[(j * C + k) * 2];
      s1 += partial[(j * C + k) * 2 + 1];
    }
    if (SECOND) {
      out_t* o2 = out.second + k * out.second_stride;
      *o2 = out.accumulate ? static_cast<out_t>(*o2 + static_cast<out_t>(s2)) : static_cast<out_t>(s2);
    }
    out_t* o1 = out.first + k * out.first_stride;
    *o1 = out.accumulate ? static_cast<out_t>(*o1 + static_cast<out_t>(s1)) : static_cast<out_t>(s1);
  }
}

// The CPU backend of the shared entries (common/channel.h): reduces the (non-empty) problem into
// `second` (undefined: first-order only) and `first`.
void channel_reduce_into_cpu(const ChannelProblem& prob, const at::Tensor& second,
                             const at::Tensor& first, bool accumulate) {
  std::vector<double> partial;
  OBA_DISPATCH_FLOATS(prob.a.scalar_type(), "channel_score_reduce_cpu", [&] {
    const auto p = channel_params<scalar_t>(prob);
    dispatch_channel_terms(prob, [&](auto terms) {
      using Terms = decltype(terms);
      partial = prob.channels_last ? reduce_cols<Terms>(p) : reduce_rows<Terms>(p);
    });
  });
  OBA_DISPATCH_OUT(first.scalar_type(), "channel_score_reduce_cpu_out", [&] {
    const auto out = channel_out_params<scalar_t>(second, first, accumulate);
    if (prob.second) {
      write_out<true>(partial, prob.channels, out);
    } else {
      write_out<false>(partial, prob.channels, out);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(oba_ext, CPU, m) { register_channel_ops<channel_reduce_into_cpu>(m); }

}  // namespace oba_ext
