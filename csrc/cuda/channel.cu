// CUDA kernels of channel_score_reduce(_add_) and channel_first_order_reduce (SPEC §5 structured
// scores):
//   second[k] = Σ a⊙(b − d) + c⊙d  (b, c None = 0),   first[k] = Σ a⊙d   (over every dim but
// channel_dim). Products and sums in float32 for float16/bfloat16/float32 inputs, float64 for
// float64. Deterministic two-stage reduction, no atomics: stage 1 writes one partial per
// (split, channel), stage 2 adds the splits in order. All index arithmetic, the per-element terms
// and the launch plan are the OBA_HD functions of common/channel_kernel.h, which the CPU tests
// run in the same block/thread decomposition (csrc/cpu/channel_emulate.cpp); the kernels below
// only map CUDA's built-in indices and shared memory onto them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../common/channel.h"
#include "../common/channel_kernel.h"
#include "../common/dispatch.h"
#include "../common/params.h"
#include "../common/reduce.cuh"

namespace oba_ext {
namespace {

// Layout (outer, C, inner). Grid (C, nsplit); block (k, split) sums rows [o0, o1) of channel k.
template <typename Terms, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kChannelRowThreads)
    channel_reduce_rows_kernel(ChannelReduceParams<scalar_t> p, int64_t rows_per_split,
                               acc_t* __restrict__ partial) {
  __shared__ acc_t smem[2 * kWarpSize];
  acc_t s2 = 0, s1 = 0;
  channel_rows_thread<Terms>(p, rows_per_split, blockIdx.x, blockIdx.y, threadIdx.x, blockDim.x,
                             s2, s1);
  block_reduce_sum2(s2, s1, smem);
  if (threadIdx.x == 0) {
    const int64_t j = channel_rows_partial_index(blockIdx.x, blockIdx.y, p.channels);
    partial[j] = s2;
    partial[j + 1] = s1;
  }
}

// Layout (M, C), C innermost. Block (kChannelColsX, kChannelColsY), grid (ceil(C / kColsX),
// nsplit): thread (x, y) sums rows m0 + y, m0 + y + kColsY, ... of channel bx * kColsX + x
// (coalesced across x), then the kColsY row partials are added in order of y.
template <typename Terms, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kChannelColsX * kChannelColsY)
    channel_reduce_cols_kernel(ChannelReduceParams<scalar_t> p, int64_t rows_per_split,
                               acc_t* __restrict__ partial) {
  __shared__ acc_t sm2[kChannelColsY][kChannelColsX + 1];
  __shared__ acc_t sm1[kChannelColsY][kChannelColsX + 1];
  acc_t s2 = 0, s1 = 0;
  channel_cols_thread<Terms>(p, rows_per_split, blockIdx.x, blockIdx.y, threadIdx.x, threadIdx.y,
                             s2, s1);
  sm2[threadIdx.y][threadIdx.x] = s2;
  sm1[threadIdx.y][threadIdx.x] = s1;
  __syncthreads();
  const int64_t k = channel_cols_channel(blockIdx.x, threadIdx.x);
  if (threadIdx.y == 0 && k < p.channels) {
    const int64_t j = channel_partial_index(blockIdx.y, p.channels, k);
    partial[j] = channel_cols_combine<acc_t>(sm2, threadIdx.x);
    partial[j + 1] = channel_cols_combine<acc_t>(sm1, threadIdx.x);
  }
}

// Stage 2: channel k adds its nsplit partials in split order and writes (or adds to) the output.
template <bool SECOND, typename acc_t, typename out_t>
__global__ void channel_reduce_finalize_kernel(const acc_t* __restrict__ partial, int64_t nsplit,
                                               int64_t channels, ChannelOutParams<out_t> out) {
  channel_finalize_thread<SECOND>(partial, nsplit, channels, out, blockIdx.x, threadIdx.x,
                                  gridDim.x, blockDim.x);
}

int multiprocessor_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return std::max(sms, 1);
}

// The CUDA backend of the shared entries (common/channel.h): reduces the (non-empty) problem into
// `second` (undefined: first-order only) and `first`, on the device of the (checked) inputs.
void channel_reduce_into_cuda(const ChannelProblem& prob, const at::Tensor& second,
                              const at::Tensor& first, bool accumulate) {
  const c10::cuda::CUDAGuard guard(prob.a.device());
  const ChannelLaunchPlan plan = channel_launch_plan(prob.outer, prob.channels, prob.inner,
                                                     prob.channels_last, multiprocessor_count());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  OBA_DISPATCH_FLOATS(prob.a.scalar_type(), "channel_score_reduce_cuda", [&] {
    using in_t = scalar_t;
    using acc_t = typename ChannelAcc<in_t>::type;
    const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
    // every partial is written by stage 1 (each (split, channel) has one block / thread column)
    at::Tensor partial = at::empty({plan.nsplit * prob.channels * 2}, prob.a.options().dtype(acc_dtype));
    acc_t* part = partial.data_ptr<acc_t>();
    const auto p = channel_params<in_t>(prob);
    const dim3 grid(plan.grid_x, static_cast<unsigned>(plan.nsplit));
    const dim3 block(plan.block_x, plan.block_y);
    dispatch_channel_terms(prob, [&](auto terms) {
      using Terms = decltype(terms);
      if (plan.cols) {
        channel_reduce_cols_kernel<Terms, in_t, acc_t>
            <<<grid, block, 0, stream>>>(p, plan.rows_per_split, part);
      } else {
        channel_reduce_rows_kernel<Terms, in_t, acc_t>
            <<<grid, block, 0, stream>>>(p, plan.rows_per_split, part);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    OBA_DISPATCH_OUT(first.scalar_type(), "channel_score_reduce_cuda_out", [&] {
      const auto out = channel_out_params<scalar_t>(second, first, accumulate);
      if (prob.second) {
        channel_reduce_finalize_kernel<true, acc_t, scalar_t>
            <<<plan.finalize_blocks, kChannelFinalizeThreads, 0, stream>>>(part, plan.nsplit,
                                                                          prob.channels, out);
      } else {
        channel_reduce_finalize_kernel<false, acc_t, scalar_t>
            <<<plan.finalize_blocks, kChannelFinalizeThreads, 0, stream>>>(part, plan.nsplit,
                                                                          prob.channels, out);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(oba_ext, CUDA, m) { register_channel_ops<channel_reduce_into_cuda>(m); }

}  // namespace oba_ext
