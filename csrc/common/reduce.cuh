// Deterministic block reductions (fixed shuffle tree, no atomics), shared by the CUDA kernels.
// reduce.h replays the same order of additions on the host for the CPU emulation tests.
#pragma once

#include <cuda_runtime.h>

#include "reduce.h"

namespace oba_ext {

template <typename acc_t>
__device__ __forceinline__ acc_t warp_reduce_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sums x and y over the whole block (blockDim.x a multiple of 32, at most 1024 threads; 1-D
// blocks). The result is valid in thread 0 only. `smem` holds 2 * 32 acc_t. The order of
// additions is fixed by the block shape, so the result is bitwise reproducible.
template <typename acc_t>
__device__ __forceinline__ void block_reduce_sum2(acc_t& x, acc_t& y, acc_t* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  x = warp_reduce_sum(x);
  y = warp_reduce_sum(y);
  if (lane == 0) {
    smem[warp] = x;
    smem[kWarpSize + warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    x = lane < nwarps ? smem[lane] : acc_t(0);
    y = lane < nwarps ? smem[kWarpSize + lane] : acc_t(0);
    x = warp_reduce_sum(x);
    y = warp_reduce_sum(y);
  }
}

}  // namespace oba_ext
