// CUDA kernels of channel_score_reduce(_add_) (SPEC §5 structured scores):
//   second[k] = Σ a⊙(b − d) + c⊙d,   first[k] = Σ a⊙d   (over every dim but channel_dim).
// Accumulates in float32 (float64 for float64 inputs). Deterministic two-stage reduction, no
// atomics: stage 1 writes one partial per (split, channel), stage 2 adds the splits in order.
#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <optional>
#include <tuple>

#include "../common/channel.h"
#include "../common/dispatch.h"
#include "../common/params.h"
#include "../common/reduce.cuh"

namespace oba_ext {
namespace {

constexpr int kRowThreads = 256;
constexpr int kColsX = 32;  // channels per block (coalesced)
constexpr int kColsY = 8;   // rows in flight per block
constexpr int64_t kMaxSplits = 65535;

// Layout (outer, C, inner). Grid (C, nsplit); block k sums rows [o0, o1) of channel k.
// rows_per_split * inner < 2^31 (host-checked), so the flat index fits 32 bits.
template <typename scalar_t, typename acc_t, bool HAS_B>
__global__ void __launch_bounds__(kRowThreads)
    channel_reduce_rows_kernel(ChannelReduceParams<scalar_t> p, int64_t rows_per_split,
                               acc_t* __restrict__ partial) {
  __shared__ acc_t smem[2 * kWarpSize];
  const int64_t k = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t o0 = split * rows_per_split;
  const int64_t o1 = o0 + rows_per_split < p.outer ? o0 + rows_per_split : p.outer;
  acc_t s2 = 0, s1 = 0;
  if (o0 < o1) {
    const uint32_t inner = static_cast<uint32_t>(p.inner);
    const uint32_t count = static_cast<uint32_t>((o1 - o0) * p.inner);
    for (uint32_t e = threadIdx.x; e < count; e += blockDim.x) {
      const uint32_t r = e / inner;
      const uint32_t i = e - r * inner;
      const int64_t idx = ((o0 + r) * p.channels + k) * p.inner + i;
      const acc_t av = static_cast<acc_t>(p.a[idx]);
      const acc_t bv = HAS_B ? static_cast<acc_t>(p.b[idx]) : acc_t(0);
      const acc_t cv = static_cast<acc_t>(p.c[idx]);
      const acc_t dv = static_cast<acc_t>(p.d[idx]);
      s2 += av * (bv - dv) + cv * dv;
      s1 += av * dv;
    }
  }
  block_reduce_sum2(s2, s1, smem);
  if (threadIdx.x == 0) {
    partial[(split * p.channels + k) * 2] = s2;
    partial[(split * p.channels + k) * 2 + 1] = s1;
  }
}

// Layout (M, C), C innermost. Block (kColsX, kColsY), grid (ceil(C / kColsX), nsplit): thread
// (x, y) sums rows m0 + y, m0 + y + kColsY, ... of channel blockIdx.x * kColsX + x (coalesced
// across x), then the kColsY row partials are added in order of y.
template <typename scalar_t, typename acc_t, bool HAS_B>
__global__ void __launch_bounds__(kColsX * kColsY)
    channel_reduce_cols_kernel(ChannelReduceParams<scalar_t> p, int64_t rows_per_split,
                               acc_t* __restrict__ partial) {
  __shared__ acc_t sm2[kColsY][kColsX + 1];
  __shared__ acc_t sm1[kColsY][kColsX + 1];
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kColsX + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t m0 = split * rows_per_split;
  const int64_t m1 = m0 + rows_per_split < p.outer ? m0 + rows_per_split : p.outer;
  acc_t s2 = 0, s1 = 0;
  if (k < p.channels) {
    for (int64_t m = m0 + threadIdx.y; m < m1; m += kColsY) {
      const int64_t idx = m * p.channels + k;
      const acc_t av = static_cast<acc_t>(p.a[idx]);
      const acc_t bv = HAS_B ? static_cast<acc_t>(p.b[idx]) : acc_t(0);
      const acc_t cv = static_cast<acc_t>(p.c[idx]);
      const acc_t dv = static_cast<acc_t>(p.d[idx]);
      s2 += av * (bv - dv) + cv * dv;
      s1 += av * dv;
    }
  }
  sm2[threadIdx.y][threadIdx.x] = s2;
  sm1[threadIdx.y][threadIdx.x] = s1;
  __syncthreads();
  if (threadIdx.y == 0 && k < p.channels) {
    acc_t t2 = 0, t1 = 0;
#pragma unroll
    for (int y = 0; y < kColsY; ++y) {
      t2 += sm2[y][threadIdx.x];
      t1 += sm1[y][threadIdx.x];
    }
    partial[(split * p.channels + k) * 2] = t2;
    partial[(split * p.channels + k) * 2 + 1] = t1;
  }
}

// Stage 2: channel k adds its nsplit partials in split order and writes (or adds to) the output.
template <typename acc_t, typename out_t>
__global__ void channel_reduce_finalize_kernel(const acc_t* __restrict__ partial, int64_t nsplit,
                                               int64_t channels, ChannelOutParams<out_t> out) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < channels;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s2 = 0, s1 = 0;
    for (int64_t s = 0; s < nsplit; ++s) {
      s2 += partial[(s * channels + k) * 2];
      s1 += partial[(s * channels + k) * 2 + 1];
    }
    out_t* o2 = out.second + k * out.second_stride;
    out_t* o1 = out.first + k * out.first_stride;
    *o2 = out.accumulate ? static_cast<out_t>(*o2 + static_cast<out_t>(s2)) : static_cast<out_t>(s2);
    *o1 = out.accumulate ? static_cast<out_t>(*o1 + static_cast<out_t>(s1)) : static_cast<out_t>(s1);
  }
}

int multiprocessor_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return std::max(sms, 1);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of row splits: ~4 blocks per SM in total, each block with >= min_rows rows, at most
// kMaxSplits, and rows_per_split * row_elems < 2^31.
int64_t choose_splits(int64_t rows, int64_t row_elems, int64_t blocks_x, int64_t min_rows) {
  const int64_t target = 4 * static_cast<int64_t>(multiprocessor_count());
  int64_t n = ceil_div(target, blocks_x);
  n = std::min(n, ceil_div(rows, min_rows));
  n = std::max(n, ceil_div(rows * row_elems, int64_t(1) << 30));
  return std::max<int64_t>(1, std::min({n, rows, kMaxSplits}));
}

template <typename scalar_t, typename acc_t, bool HAS_B>
void launch_stage1(const ChannelProblem& prob, int64_t nsplit, acc_t* partial, cudaStream_t stream) {
  const auto p = channel_params<scalar_t>(prob);
  const int64_t rows_per_split = ceil_div(prob.outer, nsplit);
  if (prob.channels_last) {
    const dim3 grid(static_cast<unsigned>(ceil_div(prob.channels, kColsX)), static_cast<unsigned>(nsplit));
    channel_reduce_cols_kernel<scalar_t, acc_t, HAS_B>
        <<<grid, dim3(kColsX, kColsY), 0, stream>>>(p, rows_per_split, partial);
  } else {
    const dim3 grid(static_cast<unsigned>(prob.channels), static_cast<unsigned>(nsplit));
    channel_reduce_rows_kernel<scalar_t, acc_t, HAS_B>
        <<<grid, kRowThreads, 0, stream>>>(p, rows_per_split, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shared by both entries: reduces the (non-empty) problem into `second` / `first`.
void channel_reduce_into_cuda(const ChannelProblem& prob, const at::Tensor& second,
                              const at::Tensor& first, bool accumulate) {
  const char* fn = "channel_score_reduce";
  TORCH_CHECK(prob.channels_last || prob.inner < (int64_t(1) << 31), fn,
              ": the product of the dims after channel_dim must be < 2^31 on CUDA, got ", prob.inner);
  TORCH_CHECK(prob.channels_last || prob.channels <= INT32_MAX, fn, ": too many channels (",
              prob.channels, ")");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t nsplit = prob.channels_last
                             ? choose_splits(prob.outer, prob.channels, ceil_div(prob.channels, kColsX), 32)
                             : choose_splits(prob.outer, prob.inner, prob.channels,
                                             std::max<int64_t>(1, ceil_div(2048, prob.inner)));
  OBA_DISPATCH_FLOATS(prob.a.scalar_type(), "channel_score_reduce_cuda", [&] {
    using in_t = scalar_t;
    using acc_t = at::acc_type<in_t, /*is_cuda=*/true>;
    const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
    at::Tensor partial = at::empty({nsplit * prob.channels * 2}, prob.a.options().dtype(acc_dtype));
    acc_t* part = partial.data_ptr<acc_t>();
    if (prob.b.defined()) {
      launch_stage1<in_t, acc_t, true>(prob, nsplit, part, stream);
    } else {
      launch_stage1<in_t, acc_t, false>(prob, nsplit, part, stream);
    }
    OBA_DISPATCH_OUT(second.scalar_type(), "channel_score_reduce_cuda_out", [&] {
      ChannelOutParams<scalar_t> out{second.data_ptr<scalar_t>(), first.data_ptr<scalar_t>(),
                                     second.stride(0), first.stride(0), accumulate};
      const unsigned blocks = grid_for(prob.channels, 256, 4096);
      channel_reduce_finalize_kernel<acc_t, scalar_t>
          <<<blocks, 256, 0, stream>>>(part, nsplit, prob.channels, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_score_reduce_cuda(const at::Tensor& a,
                                                             const std::optional<at::Tensor>& b,
                                                             const at::Tensor& c, const at::Tensor& d,
                                                             int64_t channel_dim) {
  const char* fn = "channel_score_reduce";
  const int64_t dim = check_channel_inputs(fn, a, b, c, d, channel_dim);
  const auto opts = a.options().dtype(channel_out_dtype(a));
  const int64_t channels = a.size(dim);
  if (a.numel() == 0) return {at::zeros({channels}, opts), at::zeros({channels}, opts)};
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor second = at::empty({channels}, opts), first = at::empty({channels}, opts);
  channel_reduce_into_cuda(make_channel_problem(a, b, c, d, dim), second, first, false);
  return {second, first};
}

void channel_score_reduce_add__cuda(const at::Tensor& a, const std::optional<at::Tensor>& b,
                                    const at::Tensor& c, const at::Tensor& d, int64_t channel_dim,
                                    at::Tensor& second_acc, at::Tensor& first_acc) {
  const char* fn = "channel_score_reduce_add_";
  const int64_t dim = check_channel_inputs(fn, a, b, c, d, channel_dim);
  check_channel_accumulators(fn, a, dim, second_acc, first_acc);
  if (a.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  channel_reduce_into_cuda(make_channel_problem(a, b, c, d, dim), second_acc, first_acc, true);
}

TORCH_LIBRARY_IMPL(oba_ext, CUDA, m) {
  m.impl("channel_score_reduce", &channel_score_reduce_cuda);
  m.impl("channel_score_reduce_add_", &channel_score_reduce_add__cuda);
}

}  // namespace oba_ext
