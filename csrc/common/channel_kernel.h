// The arithmetic of the channel_score_reduce / channel_first_order_reduce CUDA kernels
// (csrc/cuda/channel.cu), written once as OBA_HD (__host__ __device__) functions:
//   - the per-element terms and their dtype conversions (float16/bfloat16/float32 -> float32,
//     float64 -> float64: products and sums never happen in 16-bit),
//   - the launch plan (how many row splits, grid and block shape),
//   - each stage-1 thread's index loop, given the raw (blockIdx, threadIdx) of the CUDA launch,
//   - where a block stores its partial, the fixed order in which the column kernel combines its
//     row partials, and each stage-2 thread's loop over channels.
// channel.cu calls these from its kernels. csrc/cpu/channel_emulate.cpp calls the SAME functions
// from host loops over every (block, thread) of the same launch plan (with an emulation of the
// warp-shuffle tree of reduce.cuh), so the CPU tests (tests/test_kernel_device_arithmetic.py)
// execute the device code path and an index or reduction-order bug here fails them without a GPU.
// What the emulation cannot see: the shuffle/shared-memory primitives themselves
// (reduce.cuh), races, and the GPU's contraction of a*b + c into FMAs (nvcc -fmad=true), which
// changes float32 results by rounding only.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "hostdevice.h"
#include "params.h"

namespace oba_ext {

// ---- what is summed --------------------------------------------------------------------------
// SECOND: second = Σ a⊙(b−d) + c⊙d is computed (with HAS_B / HAS_C false meaning b = 0 / c = 0)
// besides first = Σ a⊙d; SECOND == false: first only (b and c are not read).
template <bool HAS_B, bool HAS_C, bool SECOND>
struct ChannelTerms {
  static constexpr bool has_b = HAS_B;
  static constexpr bool has_c = HAS_C;
  static constexpr bool second = SECOND;
};

// Accumulation type of the CUDA kernels: float32 for float16/bfloat16/float32 inputs, float64
// for float64 (the same as at::acc_type<T, /*is_cuda=*/true>).
template <typename scalar_t>
struct ChannelAcc {
  using type = float;
};
template <>
struct ChannelAcc<double> {
  using type = double;
};

// The terms of one index, for any value type V with +, -, * (a float, or a SIMD vector of
// float64 lanes in the CPU kernels of csrc/cpu/channel_cpu_kernels.h): load(x, idx) reads input x
// at idx as V. Every product, the difference b − d and the running sums are in V.
template <typename Terms, typename V, typename Load, typename scalar_t>
OBA_HD inline void channel_terms(const ChannelReduceParams<scalar_t>& p, int64_t idx,
                                 const Load& load, V& s2, V& s1) {
  const V av = load(p.a, idx);
  const V dv = load(p.d, idx);
  if constexpr (Terms::second) {
    V t;
    if constexpr (Terms::has_b) {
      t = av * (load(p.b, idx) - dv);
    } else {
      t = -(av * dv);
    }
    if constexpr (Terms::has_c) t += load(p.c, idx) * dv;
    s2 += t;
  }
  s1 += av * dv;
}

// Reads one input element converted to acc_t.
template <typename acc_t>
struct ChannelScalarLoad {
  template <typename scalar_t>
  OBA_HD acc_t operator()(const scalar_t* x, int64_t idx) const {
    return static_cast<acc_t>(x[idx]);
  }
};

// The terms of one element: every input is converted to acc_t first, so each product, the
// difference b − d and the running sums are in acc_t (never in float16/bfloat16).
template <typename Terms, typename acc_t, typename scalar_t>
OBA_HD inline void channel_element(const ChannelReduceParams<scalar_t>& p, int64_t idx, acc_t& s2,
                                   acc_t& s1) {
  channel_terms<Terms>(p, idx, ChannelScalarLoad<acc_t>{}, s2, s1);
}

// ---- launch plan -----------------------------------------------------------------------------
constexpr int kChannelRowThreads = 256;  // rows kernel: 1-D blocks
constexpr int kChannelColsX = 32;        // cols kernel: channels per block (coalesced)
constexpr int kChannelColsY = 8;         // cols kernel: rows in flight per block
constexpr int kChannelFinalizeThreads = 256;
constexpr int kChannelFinalizeMaxBlocks = 4096;
constexpr int64_t kChannelMaxSplits = 65535;  // gridDim.y limit

OBA_HD inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct ChannelLaunchPlan {
  bool cols = false;           // true: channel-innermost (M, C) kernel; false: (outer, C, inner)
  int64_t nsplit = 1;          // row splits = gridDim.y of stage 1
  int64_t rows_per_split = 1;  // split s covers rows [s * rows_per_split, min(rows, ...))
  unsigned grid_x = 1;         // stage 1 gridDim.x
  unsigned block_x = 1, block_y = 1;
  unsigned finalize_blocks = 1;  // stage 2: 1-D grid of kChannelFinalizeThreads-thread blocks
};

// Number of row splits: ~4 blocks per SM in total, each block with >= min_rows rows, at most
// kChannelMaxSplits, and rows_per_split * row_elems <= 2^30 where the split count allows it.
inline int64_t channel_choose_splits(int64_t rows, int64_t row_elems, int64_t blocks_x,
                                     int64_t min_rows, int64_t sms) {
  const int64_t target = 4 * std::max<int64_t>(sms, 1);
  int64_t n = ceil_div64(target, blocks_x);
  n = std::min(n, ceil_div64(rows, min_rows));
  n = std::max(n, ceil_div64(rows * row_elems, int64_t(1) << 30));
  return std::max<int64_t>(1, std::min({n, rows, kChannelMaxSplits}));
}

// The stage-1/stage-2 launch shape for a problem (outer, channels, inner) on a device with `sms`
// multiprocessors; `force_splits` > 0 overrides the split count (emulation tests use it to reach
// uneven and empty splits on small sizes). Raises when the 32-bit index of the rows kernel
// or the grid limits would overflow.
inline ChannelLaunchPlan channel_launch_plan(int64_t outer, int64_t channels, int64_t inner,
                                             bool channels_last, int64_t sms,
                                             int64_t force_splits = 0) {
  const char* fn = "channel_score_reduce";
  ChannelLaunchPlan plan;
  plan.cols = channels_last;
  if (channels_last) {
    const int64_t blocks_x = ceil_div64(channels, kChannelColsX);
    TORCH_CHECK(blocks_x <= INT32_MAX, fn, ": too many channels (", channels, ") for one grid");
    plan.nsplit = channel_choose_splits(outer, channels, blocks_x, 32, sms);
    plan.grid_x = static_cast<unsigned>(blocks_x);
    plan.block_x = kChannelColsX;
    plan.block_y = kChannelColsY;
  } else {
    TORCH_CHECK(inner < (int64_t(1) << 31), fn,
                ": the product of the dims after channel_dim must be < 2^31 on CUDA, got ", inner);
    TORCH_CHECK(channels <= INT32_MAX, fn, ": too many channels (", channels, ")");
    plan.nsplit = channel_choose_splits(outer, inner, channels,
                                        std::max<int64_t>(1, ceil_div64(2048, inner)), sms);
    plan.grid_x = static_cast<unsigned>(channels);
    plan.block_x = kChannelRowThreads;
    plan.block_y = 1;
  }
  if (force_splits > 0) plan.nsplit = std::min(force_splits, kChannelMaxSplits);
  plan.rows_per_split = ceil_div64(outer, plan.nsplit);
  TORCH_CHECK(plan.cols || plan.rows_per_split * inner < (int64_t(1) << 31), fn,
              ": a row split of ", plan.rows_per_split, " rows x ", inner,
              " elements exceeds the 32-bit element index of the CUDA kernel");
  const int64_t fblocks = ceil_div64(channels, kChannelFinalizeThreads);
  plan.finalize_blocks = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(fblocks, kChannelFinalizeMaxBlocks)));
  return plan;
}

// ---- stage 1 ---------------------------------------------------------------------------------
// partial[(split * channels + k) * 2 + {0: second, 1: first}]
OBA_HD inline int64_t channel_partial_index(int64_t split, int64_t channels, int64_t k) {
  return (split * channels + k) * 2;
}

// Rows kernel (layout (outer, C, inner)), block (bx, by) = (channel k, split), thread tid of
// nthreads: sums the flat elements e = tid, tid + nthreads, ... of rows [o0, o1) of channel k.
// rows_per_split * inner < 2^31 (channel_launch_plan), so e fits 32 bits.
template <typename Terms, typename acc_t, typename scalar_t>
OBA_HD inline void channel_rows_thread(const ChannelReduceParams<scalar_t>& p,
                                       int64_t rows_per_split, unsigned bx, unsigned by,
                                       unsigned tid, unsigned nthreads, acc_t& s2, acc_t& s1) {
  const int64_t k = bx;
  const int64_t o0 = static_cast<int64_t>(by) * rows_per_split;
  const int64_t o1 = o0 + rows_per_split < p.outer ? o0 + rows_per_split : p.outer;
  if (o0 >= o1) return;
  const uint32_t inner = static_cast<uint32_t>(p.inner);
  const uint32_t count = static_cast<uint32_t>((o1 - o0) * p.inner);
  for (uint32_t e = tid; e < count; e += nthreads) {
    const uint32_t r = e / inner;
    const uint32_t i = e - r * inner;
    const int64_t idx = ((o0 + r) * p.channels + k) * p.inner + i;
    channel_element<Terms>(p, idx, s2, s1);
  }
}

// Rows kernel: where thread 0 of block (bx, by) stores the block's sums.
OBA_HD inline int64_t channel_rows_partial_index(unsigned bx, unsigned by, int64_t channels) {
  return channel_partial_index(by, channels, bx);
}

// Cols kernel (layout (M, C), C innermost), block (bx, by), thread (tx, ty): the channel of
// thread column tx (>= channels means idle).
OBA_HD inline int64_t channel_cols_channel(unsigned bx, unsigned tx) {
  return static_cast<int64_t>(bx) * kChannelColsX + tx;
}

// Cols kernel: thread (tx, ty) sums rows m0 + ty, m0 + ty + kChannelColsY, ... < m1 of its channel.
template <typename Terms, typename acc_t, typename scalar_t>
OBA_HD inline void channel_cols_thread(const ChannelReduceParams<scalar_t>& p,
                                       int64_t rows_per_split, unsigned bx, unsigned by,
                                       unsigned tx, unsigned ty, acc_t& s2, acc_t& s1) {
  const int64_t k = channel_cols_channel(bx, tx);
  if (k >= p.channels) return;
  const int64_t m0 = static_cast<int64_t>(by) * rows_per_split;
  const int64_t m1 = m0 + rows_per_split < p.outer ? m0 + rows_per_split : p.outer;
  for (int64_t m = m0 + ty; m < m1; m += kChannelColsY) {
    channel_element<Terms>(p, m * p.channels + k, s2, s1);
  }
}

// Cols kernel: thread (tx, 0) adds the kChannelColsY row partials of its column in order of y.
template <typename acc_t>
OBA_HD inline acc_t channel_cols_combine(const acc_t (*sm)[kChannelColsX + 1], unsigned tx) {
  acc_t t = 0;
  for (int y = 0; y < kChannelColsY; ++y) t += sm[y][tx];
  return t;
}

// ---- stage 2 ---------------------------------------------------------------------------------
// Thread tid of block bx (of nblocks blocks of nthreads) adds, for each of its channels
// k = bx * nthreads + tid, k + nblocks * nthreads, ..., the nsplit partials in split order and
// writes (or adds to) the outputs. SECOND == false: only `first` is written.
template <bool SECOND, typename acc_t, typename out_t>
OBA_HD inline void channel_finalize_thread(const acc_t* partial, int64_t nsplit, int64_t channels,
                                           const ChannelOutParams<out_t>& out, unsigned bx,
                                           unsigned tid, unsigned nblocks, unsigned nthreads) {
  const int64_t step = static_cast<int64_t>(nblocks) * nthreads;
  for (int64_t k = static_cast<int64_t>(bx) * nthreads + tid; k < channels; k += step) {
    acc_t s2 = 0, s1 = 0;
    for (int64_t s = 0; s < nsplit; ++s) {
      const int64_t j = channel_partial_index(s, channels, k);
      if constexpr (SECOND) s2 += partial[j];
      s1 += partial[j + 1];
    }
    if constexpr (SECOND) {
      out_t* o2 = out.second + k * out.second_stride;
      *o2 = out.accumulate ? static_cast<out_t>(*o2 + static_cast<out_t>(s2)) : static_cast<out_t>(s2);
    }
    out_t* o1 = out.first + k * out.first_stride;
    *o1 = out.accumulate ? static_cast<out_t>(*o1 + static_cast<out_t>(s1)) : static_cast<out_t>(s1);
  }
}

}  // namespace oba_ext
