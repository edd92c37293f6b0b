// Debug ops that run the CUDA channel kernels' device code on the CPU:
//   _emulate_channel_score_reduce_cuda(a, b?, c?, d, channel_dim, num_sms, splits)
//   _emulate_channel_first_order_reduce_cuda(a, d, channel_dim, num_sms, splits)
// They build the launch plan of csrc/cuda/channel.cu (channel_launch_plan, for a device with
// `num_sms` multiprocessors; splits > 0 forces the row-split count), then loop over every block
// and thread of both stages, calling the same OBA_HD functions as the kernels
// (common/channel_kernel.h) with the kernels' accumulation type (float32 for 16/32-bit inputs),
// and add the per-thread sums in the order of the device block reduction (common/reduce.h).
// The stage-1 partial buffer starts as NaN, so a partial the decomposition forgets to write
// poisons the result instead of reading a lucky zero. Tests: tests/test_kernel_device_arithmetic.py.
// Registered for the CPU only; not part of the public API (leading underscore).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/channel.h"
#include "../common/channel_kernel.h"
#include "../common/dispatch.h"
#include "../common/params.h"
#include "../common/reduce.h"

namespace oba_ext {
namespace {

// Stage 1 of channel.cu: one partial (second, first) per (split, channel).
template <typename Terms, typename acc_t, typename scalar_t>
std::vector<acc_t> emulate_stage1(const ChannelReduceParams<scalar_t>& p,
                                  const ChannelLaunchPlan& plan) {
  const int64_t C = p.channels;
  std::vector<acc_t> partial(static_cast<size_t>(plan.nsplit * C * 2),
                             std::numeric_limits<acc_t>::quiet_NaN());
  const unsigned grid_y = static_cast<unsigned>(plan.nsplit);
  if (!plan.cols) {
    const unsigned nthreads = plan.block_x;  // channel_reduce_rows_kernel: 1-D blocks
    std::vector<acc_t> x(nthreads), y(nthreads);
    for (unsigned by = 0; by < grid_y; ++by) {
      for (unsigned bx = 0; bx < plan.grid_x; ++bx) {
        for (unsigned t = 0; t < nthreads; ++t) {
          acc_t s2 = 0, s1 = 0;
          channel_rows_thread<Terms>(p, plan.rows_per_split, bx, by, t, nthreads, s2, s1);
          x[t] = s2;
          y[t] = s1;
        }
        acc_t s2, s1;
        block_reduce_sum2_emulated(x, y, static_cast<int>(nthreads), s2, s1);
        const int64_t j = channel_rows_partial_index(bx, by, C);
        partial[j] = s2;
        partial[j + 1] = s1;
      }
    }
  } else {
    // channel_reduce_cols_kernel: block (kChannelColsX, kChannelColsY); row partials in shared
    // memory sm[ty][tx], then thread (tx, 0) combines its column.
    acc_t sm2[kChannelColsY][kChannelColsX + 1], sm1[kChannelColsY][kChannelColsX + 1];
    for (unsigned by = 0; by < grid_y; ++by) {
      for (unsigned bx = 0; bx < plan.grid_x; ++bx) {
        for (unsigned ty = 0; ty < plan.block_y; ++ty) {
          for (unsigned tx = 0; tx < plan.block_x; ++tx) {
            acc_t s2 = 0, s1 = 0;
            channel_cols_thread<Terms>(p, plan.rows_per_split, bx, by, tx, ty, s2, s1);
            sm2[ty][tx] = s2;
            sm1[ty][tx] = s1;
          }
        }
        for (unsigned tx = 0; tx < plan.block_x; ++tx) {
          const int64_t k = channel_cols_channel(bx, tx);
          if (k >= C) continue;
          const int64_t j = channel_partial_index(by, C, k);
          partial[j] = channel_cols_combine<acc_t>(sm2, tx);
          partial[j + 1] = channel_cols_combine<acc_t>(sm1, tx);
        }
      }
    }
  }
  return partial;
}

void emulate_into(const ChannelProblem& prob, const at::Tensor& second, const at::Tensor& first,
                  int64_t num_sms, int64_t splits) {
  const ChannelLaunchPlan plan = channel_launch_plan(prob.outer, prob.channels, prob.inner,
                                                     prob.channels_last, num_sms, splits);
  OBA_DISPATCH_FLOATS(prob.a.scalar_type(), "_emulate_channel_reduce_cuda", [&] {
    using in_t = scalar_t;
    using acc_t = typename ChannelAcc<in_t>::type;
    const auto p = channel_params<in_t>(prob);
    std::vector<acc_t> partial;
    dispatch_channel_terms(prob, [&](auto terms) {
      using Terms = decltype(terms);
      partial = emulate_stage1<Terms, acc_t>(p, plan);
    });
    OBA_DISPATCH_OUT(first.scalar_type(), "_emulate_channel_reduce_cuda_out", [&] {
      const auto out = channel_out_params<scalar_t>(second, first, /*accumulate=*/false);
      // channel_reduce_finalize_kernel: plan.finalize_blocks blocks of kChannelFinalizeThreads.
      for (unsigned bx = 0; bx < plan.finalize_blocks; ++bx) {
        for (unsigned t = 0; t < kChannelFinalizeThreads; ++t) {
          if (prob.second) {
            channel_finalize_thread<true>(partial.data(), plan.nsplit, prob.channels, out, bx, t,
                                          plan.finalize_blocks, kChannelFinalizeThreads);
          } else {
            channel_finalize_thread<false>(partial.data(), plan.nsplit, prob.channels, out, bx, t,
                                           plan.finalize_blocks, kChannelFinalizeThreads);
          }
        }
      }
    });
  });
}

void check_emulation_args(int64_t num_sms, int64_t splits) {
  TORCH_CHECK(num_sms >= 1, "_emulate_channel_reduce_cuda: argument 'num_sms' must be >= 1, got ",
              num_sms);
  TORCH_CHECK(splits >= 0, "_emulate_channel_reduce_cuda: argument 'splits' must be >= 0 (0 = the ",
              "launch plan's choice), got ", splits);
}

std::tuple<at::Tensor, at::Tensor> emulate_channel_score_reduce_cuda(
    const at::Tensor& a, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& c,
    const at::Tensor& d, int64_t channel_dim, int64_t num_sms, int64_t splits) {
  check_emulation_args(num_sms, splits);
  return channel_score_reduce_entry(
      a, b, c, d, channel_dim,
      [&](const ChannelProblem& prob, const at::Tensor& second, const at::Tensor& first, bool) {
        emulate_into(prob, second, first, num_sms, splits);
      });
}

at::Tensor emulate_channel_first_order_reduce_cuda(const at::Tensor& a, const at::Tensor& d,
                                                   int64_t channel_dim, int64_t num_sms,
                                                   int64_t splits) {
  check_emulation_args(num_sms, splits);
  return channel_first_order_reduce_entry(
      a, d, channel_dim,
      [&](const ChannelProblem& prob, const at::Tensor& second, const at::Tensor& first, bool) {
        emulate_into(prob, second, first, num_sms, splits);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(oba_ext, CPU, m) {
  m.impl("_emulate_channel_score_reduce_cuda", &emulate_channel_score_reduce_cuda);
  m.impl("_emulate_channel_first_order_reduce_cuda", &emulate_channel_first_order_reduce_cuda);
}

}  // namespace oba_ext
