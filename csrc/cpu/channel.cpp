// CPU kernels of channel_score_reduce(_add_) and channel_first_order_reduce (SPEC §5 structured
// scores):
//   second[k] = Σ a⊙(b − d) + c⊙d  (b, c None = 0),   first[k] = Σ a⊙d,
// summed over every dim but channel_dim. The per-element terms are the device code's
// (channel_terms in common/channel_kernel.h) in float64: every input is converted to float64
// before any product, and sums accumulate in float64. The task kernels are vectorised with
// at::vec, one build per ISA picked at run time (channel_cpu_kernels.h); this file cuts the work
// into tasks, runs them on ATen's thread pool and combines the partials. Deterministic: the work
// is cut into a fixed number of chunks that depends on the shape only (not on the thread count),
// and the chunk partials are added in chunk order.
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
#include "channel_cpu.h"

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

// ---- runtime ISA dispatch ----------------------------------------------------------------------
// The two task kernels (one task of each layout) are at::vec code compiled once per ISA
// (channel_cpu_kernels.h, channel_isa_*.cpp; it says why there is no AVX-512 build). The AVX2
// build runs when the CPU has AVX2 and FMA (__builtin_cpu_supports) and ATen's CPU capability is
// AVX2 or better, so ATEN_CPU_CAPABILITY=default selects the baseline build, as it does for
// ATen's own kernels.
bool use_avx2() {
#if OBA_CHANNEL_CPU_CLONES
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

template <typename Terms, typename scalar_t>
ChannelCpuTasks<scalar_t> channel_tasks() {
#if OBA_CHANNEL_CPU_CLONES
  if (use_avx2()) return cpu_avx2::channel_cpu_tasks<Terms, scalar_t>();
#endif
  return cpu_default::channel_cpu_tasks<Terms, scalar_t>();
}

template <typename Terms, typename scalar_t>
std::vector<double> reduce_cols(const ChannelReduceParams<scalar_t>& p,
                                const ChannelCpuTasks<scalar_t>& tasks);

// Layout (outer, C, inner) with a short `inner` (fewer than kRowsMinInnerVectors vectors per
// (o, k) span, e.g. the 2x2 maps late in a CNN on small images): a span is too short for the rows
// kernel's vectors, so the problem is reduced as layout (outer, C * inner) by the cols kernel,
// vectorised across the contiguous (k, i), and the inner partials of each (chunk, k) are then
// added in order of i. partial[(j*C + k)*2 + {0, 1}] as in reduce_rows. (Measured, one thread,
// C = 256-512, AVX2 build: 2x2 maps 1.4x faster this way; 3x3 about the same; 4x4 and larger
// 1.3-2x slower.)
constexpr int64_t kRowsMinInnerVectors = 2;

template <typename Terms, typename scalar_t>
std::vector<double> reduce_rows_as_cols(const ChannelReduceParams<scalar_t>& p,
                                        const ChannelCpuTasks<scalar_t>& tasks) {
  const int64_t C = p.channels, inner = p.inner;
  ChannelReduceParams<scalar_t> flat = p;
  flat.channels = C * inner;
  flat.inner = 1;
  const std::vector<double> wide = reduce_cols<Terms>(flat, tasks);
  const int64_t chunks = static_cast<int64_t>(wide.size()) / (2 * C * inner);
  std::vector<double> partial(static_cast<size_t>(chunks * C * 2));
  for (int64_t j = 0; j < chunks; ++j) {
    for (int64_t k = 0; k < C; ++k) {
      double s2 = 0.0, s1 = 0.0;
      for (int64_t i = 0; i < inner; ++i) {
        s2 += wide[((j * C + k) * inner + i) * 2];
        s1 += wide[((j * C + k) * inner + i) * 2 + 1];
      }
      partial[(j * C + k) * 2] = s2;
      partial[(j * C + k) * 2 + 1] = s1;
    }
  }
  return partial;
}

// Layout (outer, C, inner). Task (row chunk j, channel block q) streams rows [o0, o1) of the
// contiguous channel block [k0, k1) — sequential memory, ~kTaskElems per task — so both a
// large `outer` and a large `C` give parallel work. partial[(j*C + k)*2 + {0: second, 1: first}].
// (Measured on (64, 256, 16, 16) fp32: one task per channel, striding over rows, ran at half
// the bandwidth of this order.)
template <typename Terms, typename scalar_t>
std::vector<double> reduce_rows(const ChannelReduceParams<scalar_t>& p,
                                const ChannelCpuTasks<scalar_t>& tasks) {
  const int64_t C = p.channels, inner = p.inner;
  if (inner < kRowsMinInnerVectors * tasks.lanes) return reduce_rows_as_cols<Terms>(p, tasks);
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(C, kTaskElems / std::max<int64_t>(1, inner)));
  const int64_t nblocks = (C + block - 1) / block;
  const Chunking ch = chunk_rows(p.outer, block * inner);
  std::vector<double> partial(static_cast<size_t>(ch.chunks * C * 2));  // every entry written
  at::parallel_for(0, ch.chunks * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> s2(block), s1(block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / nblocks, q = t % nblocks;
      const int64_t k0 = q * block, k1 = std::min(C, k0 + block);
      const int64_t o0 = j * ch.rows_per_chunk, o1 = std::min(p.outer, o0 + ch.rows_per_chunk);
      std::fill(s2.begin(), s2.end(), 0.0);
      std::fill(s1.begin(), s1.end(), 0.0);
      tasks.rows(p, o0, o1, k0, k1, s2.data(), s1.data());
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
std::vector<double> reduce_cols(const ChannelReduceParams<scalar_t>& p,
                                const ChannelCpuTasks<scalar_t>& tasks) {
  const int64_t C = p.channels, M = p.outer;
  const Chunking ch = chunk_rows(M, C);
  std::vector<double> partial(static_cast<size_t>(ch.chunks * C * 2));  // every entry written
  at::parallel_for(0, ch.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> s2(C), s1(C);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(s2.begin(), s2.end(), 0.0);
      std::fill(s1.begin(), s1.end(), 0.0);
      const int64_t m0 = j * ch.rows_per_chunk, m1 = std::min(M, m0 + ch.rows_per_chunk);
      tasks.cols(p, m0, m1, s2.data(), s1.data());
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
      const auto tasks = channel_tasks<Terms, scalar_t>();
      partial = prob.channels_last ? reduce_cols<Terms>(p, tasks) : reduce_rows<Terms>(p, tasks);
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
