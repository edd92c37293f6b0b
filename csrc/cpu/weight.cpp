// CPU kernels of linear_weight_score / conv_weight_score (SPEC §5 per-weight scores):
//   score = w ⊙ P,  P = Σ_k grads[k]ᵀ inputs[k] (Linear) or the conv wgrad over the batch-stacked
// streams (Conv1d/2d). P comes from ATen GEMMs accumulated over the streams / one wgrad
// (common/weight.h); the ⊙w epilogue is ours and computes in float64.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/dispatch.h"
#include "../common/params.h"
#include "../common/weight.h"

namespace oba_ext {
namespace {

template <typename scalar_t, typename out_t>
void epilogue_kernel(const EpilogueParams<scalar_t, out_t>& p) {
  at::parallel_for(0, p.numel, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      p.out[i] = static_cast<out_t>(static_cast<double>(p.w[i]) * static_cast<double>(p.prod[i]));
    }
  });
}

// out = w ⊙ prod (contiguous, dtype weight_out_dtype(w)); prod undefined means prod = 0.
at::Tensor weight_epilogue_cpu(const at::Tensor& w, const at::Tensor& prod) {
  const auto opts = w.options().dtype(weight_out_dtype(w));
  if (!prod.defined() || w.numel() == 0) return at::zeros(w.sizes(), opts);
  const at::Tensor wc = w.contiguous();
  const at::Tensor pc = prod.contiguous();
  at::Tensor out = at::empty(w.sizes(), opts);
  OBA_DISPATCH_FLOATS(w.scalar_type(), "weight_epilogue_cpu", [&] {
    using in_t = scalar_t;
    OBA_DISPATCH_OUT(out.scalar_type(), "weight_epilogue_cpu_out", [&] {
      EpilogueParams<in_t, scalar_t> p{wc.const_data_ptr<in_t>(), pc.const_data_ptr<in_t>(),
                                       out.data_ptr<scalar_t>(), out.numel()};
      epilogue_kernel(p);
    });
  });
  return out;
}

}  // namespace

at::Tensor linear_weight_score_cpu(const at::Tensor& w, at::TensorList grads, at::TensorList inputs) {
  return weight_epilogue_cpu(w, linear_weight_product("linear_weight_score", w, grads, inputs));
}

at::Tensor conv_weight_score_cpu(const at::Tensor& w, at::TensorList grads, at::TensorList inputs,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  return weight_epilogue_cpu(w, conv_weight_product("conv_weight_score", w, grads, inputs, stride,
                                                    padding, dilation, groups));
}

TORCH_LIBRARY_IMPL(oba_ext, CPU, m) {
  m.impl("linear_weight_score", &linear_weight_score_cpu);
  m.impl("conv_weight_score", &conv_weight_score_cpu);
}

}  // namespace oba_ext
