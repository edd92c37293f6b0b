// CUDA kernels of the attention ops (SPEC §4): row blocks of tensor-core GEMMs plus one fused
// elementwise kernel per block.
//
// The host routine is shared with the CPU (csrc/common/attention_blocks.h): per block of
// (batch, key/value head) groups × query rows it forms S = QKᵀ, Ṡ, G_O Vᵀ, C_A with cuBLAS
// (through ATen's bmm/baddbmm: tensor cores for fp16/bf16; TF32 for float32 only when
// torch.backends.cuda.matmul.allow_tf32 is set), runs `attn_rows_*_kernel` below for the
// row-wise softmax, its tangent and the product-rule terms, and finishes with GEMMs
// (O, Ȯ, G_Q, C_Q and the key-side sums G_K, C_K, G_V, C_V). Extra memory is a few
// block-sized buffers (block_elems = 2^24 scores), not N×N per head.
//
// The row kernel: one warp per query row, lane l owning columns j ≡ l (mod 32), row sums by
// an xor-butterfly warp all-reduce. Its arithmetic and index math are the __host__
// __device__ functions of csrc/common/attention_rows.h, which the CPU build compiles too and
// the CPU tests run in this 32-lane decomposition (tests/test_attention_blocks.py).
// Inputs fp32/fp64/fp16/bf16; row arithmetic in float32 (float64 for fp64); the GEMM buffers
// are in the input dtype (cuBLAS accumulates fp16/bf16 products in float32).
//
// Not measured on a GPU yet: no GPU has run this file. The previous kernels (one warp per
// query row streaming keys one at a time, no tensor cores) were removed: an issue-bound
// estimate put them far behind cuBLAS at ViT and long-sequence sizes.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../common/attention_blocks.h"

namespace oba_ext {
namespace {

using attention::present;
using attention::Shapes;
namespace rows = attention::rows;

constexpr int kWarpsPerBlock = 4;  // rows per CTA

__device__ __forceinline__ float shfl_xor(float x, int o) {
  return __shfl_xor_sync(0xffffffffu, x, o);
}
__device__ __forceinline__ double shfl_xor(double x, int o) {
  return __shfl_xor_sync(0xffffffffu, x, o);
}
template <typename T>
__device__ __forceinline__ rows::BwdSums<T> shfl_xor(const rows::BwdSums<T>& x, int o) {
  return {shfl_xor(x.dG, o), shfl_xor(x.dC, o), shfl_xor(x.r, o)};
}

// The warp's lanes: the same butterfly as rows::EmulatedWarp (offsets 16, 8, 4, 2, 1).
struct WarpLanes {
  static constexpr int n = 32;
  int lane;
  template <typename F>
  __device__ auto sum(F&& f) const {
    auto x = f(lane);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = x + shfl_xor(x, o);
    return x;
  }
  template <typename F>
  __device__ auto max(F&& f) const {
    auto x = f(lane);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = rows::max2(x, shfl_xor(x, o));
    return x;
  }
  template <typename F>
  __device__ void each(F&& f) const {
    f(lane);
  }
};

// One warp per row; a whole warp takes the same branch (its row index is uniform), so the
// shuffles stay full.
template <bool kBackward, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    attn_rows_kernel(const rows::RowParams<scalar_t, acc_t> p, int64_t nrows) {
  const int64_t rho = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (rho >= nrows) return;
  const WarpLanes L{static_cast<int>(threadIdx.x & 31)};
  if (kBackward) {
    rows::backward_row(L, p, rho);
  } else {
    rows::forward_row(L, p, rho);
  }
}

struct CudaRows {
  template <typename T>
  using acc = at::opmath_type<T>;

  template <typename F>
  static void dispatch(at::ScalarType t, F&& f) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "attention_cuda",
                                    [&] { f(attention::TypeTag<scalar_t>{}); });
  }

  template <bool kBackward, typename scalar_t, typename acc_t>
  static void launch(const rows::RowParams<scalar_t, acc_t>& p, int64_t nrows) {
    const int64_t blocks = (nrows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    TORCH_CHECK(blocks <= INT32_MAX, "attention: ", nrows, " rows in one block is too many");
    attn_rows_kernel<kBackward, scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(blocks)), kWarpsPerBlock * 32, 0,
           c10::cuda::getCurrentCUDAStream()>>>(p, nrows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t, typename acc_t>
  void forward(const attention::Common&, const attention::RowBlock<scalar_t, acc_t>& b) {
    launch<false>(b.p, b.nrows());
  }

  template <typename scalar_t, typename acc_t>
  void backward(const attention::Common&, const attention::RowBlock<scalar_t, acc_t>& b) {
    launch<true>(b.p, b.nrows());
  }
};

Shapes check_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
                  const c10::optional<at::Tensor>& v_dot) {
  Shapes s = attention::check_qkv(op, q, k, v, q_dot, k_dot, v_dot);
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": q must be float32, float64, float16 or bfloat16, got ", t);
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_two_stream_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const c10::optional<at::Tensor>& mask,
    bool is_causal, c10::optional<double> scale) {
  const char* op = "attention_two_stream_forward";
  const Shapes s = check_cuda(op, q, k, v, q_dot, k_dot, v_dot);
  const c10::cuda::CUDAGuard guard(q.device());
  CudaRows rows;
  return attention::run_forward(rows, op, s, q, k, v, q_dot, k_dot, v_dot, mask, is_causal,
                                scale, attention::kCudaBlockElems);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_second_order_backward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const at::Tensor& G_O,
    const c10::optional<at::Tensor>& C_O, const c10::optional<at::Tensor>& mask, bool is_causal,
    c10::optional<double> scale, const at::Tensor& lse, bool exact) {
  const char* op = "attention_second_order_backward";
  const Shapes s = check_cuda(op, q, k, v, q_dot, k_dot, v_dot);
  const c10::cuda::CUDAGuard guard(q.device());
  CudaRows rows;
  return attention::run_backward(rows, op, s, q, k, v, q_dot, k_dot, v_dot, G_O, C_O, mask,
                                 is_causal, scale, lse, exact, attention::kCudaBlockElems);
}

}  // namespace

TORCH_LIBRARY_IMPL(oba_ext, CUDA, m) {
  m.impl("attention_two_stream_forward", &attention_two_stream_forward_cuda);
  m.impl("attention_second_order_backward", &attention_second_order_backward_cuda);
}

}  // namespace oba_ext
