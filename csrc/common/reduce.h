// The order of additions of the CUDA block reduction (reduce.cuh), replayed on the host.
// block_reduce_sum2_emulated() adds per-thread values exactly as block_reduce_sum2() does on the
// device (warp shuffle-down trees, then warp 0 over the per-warp sums), so the CPU emulation of
// a kernel (csrc/cpu/channel_emulate.cpp) reproduces its reduction order. Keep the two in step.
#pragma once

#include <vector>

namespace oba_ext {

constexpr int kWarpSize = 32;

// __shfl_down_sync tree over one warp's 32 values; returns lane 0's result. A lane whose source
// lane + offset is outside the warp reads its own value (as the hardware does); only lane 0's
// result is used.
template <typename acc_t>
acc_t warp_reduce_sum_emulated(const acc_t* lanes) {
  acc_t v[kWarpSize], next[kWarpSize];
  for (int l = 0; l < kWarpSize; ++l) v[l] = lanes[l];
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    for (int l = 0; l < kWarpSize; ++l) next[l] = v[l] + (l + offset < kWarpSize ? v[l + offset] : v[l]);
    for (int l = 0; l < kWarpSize; ++l) v[l] = next[l];
  }
  return v[0];
}

// block_reduce_sum2 of reduce.cuh over `nthreads` (a multiple of 32, <= 1024) per-thread values
// x[t], y[t]: the sums that thread 0 holds afterwards.
template <typename acc_t>
void block_reduce_sum2_emulated(const std::vector<acc_t>& x, const std::vector<acc_t>& y,
                                int nthreads, acc_t& x0, acc_t& y0) {
  const int nwarps = nthreads / kWarpSize;
  acc_t smx[kWarpSize], smy[kWarpSize];
  for (int w = 0; w < nwarps; ++w) {
    smx[w] = warp_reduce_sum_emulated(x.data() + w * kWarpSize);
    smy[w] = warp_reduce_sum_emulated(y.data() + w * kWarpSize);
  }
  acc_t lx[kWarpSize], ly[kWarpSize];
  for (int l = 0; l < kWarpSize; ++l) {
    lx[l] = l < nwarps ? smx[l] : acc_t(0);
    ly[l] = l < nwarps ? smy[l] : acc_t(0);
  }
  x0 = warp_reduce_sum_emulated(lx);
  y0 = warp_reduce_sum_emulated(ly);
}

}  // namespace oba_ext
