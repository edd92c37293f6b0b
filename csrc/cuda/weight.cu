// CUDA registration of linear_weight_score / conv_weight_score (SPEC §5 per-weight scores):
//   score = w ⊙ P,  P = Σ_k grads[k]ᵀ inputs[k] (cuBLAS GEMMs accumulated over the streams) or the
// conv wgrad over the stacked batch (cuDNN), in float32 (float64 for float64 weights), then ⊙w in
// place. The computation is the host code of common/weight.h, shared with the CPU registration
// (and run by the CPU tests); there is no custom kernel here. TF32: see common/weight.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/weight.h"

namespace oba_ext {
namespace {

at::Tensor linear_weight_score_cuda(const at::Tensor& w, at::TensorList grads, at::TensorList inputs) {
  check_stream_lists("linear_weight_score", w, grads, inputs);  // names a bad device before the guard
  const c10::cuda::CUDAGuard guard(w.device());
  return linear_weight_score_impl(w, grads, inputs);
}

at::Tensor conv_weight_score_cuda(const at::Tensor& w, at::TensorList grads, at::TensorList inputs,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups) {
  check_stream_lists("conv_weight_score", w, grads, inputs);
  const c10::cuda::CUDAGuard guard(w.device());
  return conv_weight_score_impl(w, grads, inputs, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(oba_ext, CUDA, m) {
  m.impl("linear_weight_score", &linear_weight_score_cuda);
  m.impl("conv_weight_score", &conv_weight_score_cuda);
}

}  // namespace oba_ext
