// CUDA kernels of linear_weight_score / conv_weight_score (SPEC §5 per-weight scores):
//   score = w ⊙ P,  P = Σ_k grads[k]ᵀ inputs[k] (Linear: cuBLAS GEMMs accumulated over the
// streams) or the conv wgrad over the stacked batch (cuDNN); the ⊙w epilogue kernel is ours and
// computes in float32 (float64 for float64 weights).
#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/dispatch.h"
#include "../common/params.h"
#include "../common/reduce.cuh"
#include "../common/weight.h"

namespace oba_ext {
namespace {

template <typename scalar_t, typename out_t>
__global__ void weight_epilogue_kernel(EpilogueParams<scalar_t, out_t> p) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.out[i] = static_cast<out_t>(static_cast<acc_t>(p.w[i]) * static_cast<acc_t>(p.prod[i]));
  }
}

// out = w ⊙ prod (contiguous, dtype weight_out_dtype(w)); prod undefined means prod = 0.
at::Tensor weight_epilogue_cuda(const at::Tensor& w, const at::Tensor& prod) {
  const auto opts = w.options().dtype(weight_out_dtype(w));
  if (!prod.defined() || w.numel() == 0) return at::zeros(w.sizes(), opts);
  const at::Tensor wc = w.contiguous();
  const at::Tensor pc = prod.contiguous();
  at::Tensor out = at::empty(w.sizes(), opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  OBA_DISPATCH_FLOATS(w.scalar_type(), "weight_epilogue_cuda", [&] {
    using in_t = scalar_t;
    OBA_DISPATCH_OUT(out.scalar_type(), "weight_epilogue_cuda_out", [&] {
      EpilogueParams<in_t, scalar_t> p{wc.const_data_ptr<in_t>(), pc.const_data_ptr<in_t>(),
                                       out.data_ptr<scalar_t>(), out.numel()};
      weight_epilogue_kernel<in_t, scalar_t><<<grid_for(p.numel, 256, 65535), 256, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

at::Tensor linear_weight_score_cuda(const at::Tensor& w, at::TensorList grads, at::TensorList inputs) {
  check_stream_lists("linear_weight_score", w, grads, inputs);  // names a bad device before the guard
  const c10::cuda::CUDAGuard guard(w.device());
  return weight_epilogue_cuda(w, linear_weight_product("linear_weight_score", w, grads, inputs));
}

at::Tensor conv_weight_score_cuda(const at::Tensor& w, at::TensorList grads, at::TensorList inputs,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups) {
  check_stream_lists("conv_weight_score", w, grads, inputs);
  const c10::cuda::CUDAGuard guard(w.device());
  return weight_epilogue_cuda(w, conv_weight_product("conv_weight_score", w, grads, inputs, stride,
                                                     padding, dilation, groups));
}

TORCH_LIBRARY_IMPL(oba_ext, CUDA, m) {
  m.impl("linear_weight_score", &linear_weight_score_cuda);
  m.impl("conv_weight_score", &conv_weight_score_cuda);
}

}  // namespace oba_ext
