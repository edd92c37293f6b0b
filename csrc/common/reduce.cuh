// Deterministic block reductions (fixed shuffle tree, no atomics), shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

namespace oba_ext {

constexpr int kWarpSize = 32;

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

// Number of blocks a grid-stride kernel should use for `n` items.
inline unsigned int grid_for(int64_t n, int threads, int max_blocks) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks);
}

}  // namespace oba_ext
