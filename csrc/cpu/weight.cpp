// CPU registration of linear_weight_score / conv_weight_score (SPEC §5 per-weight scores):
//   score = w ⊙ P,  P = Σ_k grads[k]ᵀ inputs[k] (Linear) or the conv wgrad over the batch-stacked
// streams (Conv1d/2d), in float32 (float64 for float64 weights). The whole computation is the
// host code of common/weight.h, shared with the CUDA registration.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../common/weight.h"

namespace oba_ext {

TORCH_LIBRARY_IMPL(oba_ext, CPU, m) {
  m.impl("linear_weight_score", &linear_weight_score_impl);
  m.impl("conv_weight_score", &conv_weight_score_impl);
}

}  // namespace oba_ext
