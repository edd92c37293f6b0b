// Host-side argument checks of channel_score_reduce(_add_), shared by the CPU and CUDA entries.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"

namespace oba_ext {

// Checks a, b?, c, d (same shape, dtype, device; float; at least 1-D) and returns the wrapped
// channel dim.
inline int64_t check_channel_inputs(const char* fn, const at::Tensor& a,
                                    const std::optional<at::Tensor>& b, const at::Tensor& c,
                                    const at::Tensor& d, int64_t channel_dim) {
  check_defined(a, fn, "a");
  check_defined(c, fn, "c");
  check_defined(d, fn, "d");
  check_float(a, fn, "a");
  TORCH_CHECK(a.dim() >= 1, fn, ": argument 'a' must be at least 1-D, got a scalar");
  if (b.has_value() && b->defined()) check_like(*b, "b", a, "a", fn);
  check_like(c, "c", a, "a", fn);
  check_like(d, "d", a, "a", fn);
  return wrap_dim_named(channel_dim, a.dim(), fn, "channel_dim");
}

// float64 inputs give float64 results; float32/float16/bfloat16 give float32.
inline at::ScalarType channel_out_dtype(const at::Tensor& a) {
  return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_channel_accumulators(const char* fn, const at::Tensor& a, int64_t channel_dim,
                                       const at::Tensor& second_acc, const at::Tensor& first_acc) {
  const int64_t channels = a.size(channel_dim);
  check_accumulator(second_acc, channels, a, fn, "second_acc");
  check_accumulator(first_acc, channels, a, fn, "first_acc");
  TORCH_CHECK(second_acc.scalar_type() == first_acc.scalar_type(), fn,
              ": arguments 'second_acc' and 'first_acc' must share a dtype, got ",
              second_acc.scalar_type(), " and ", first_acc.scalar_type());
  TORCH_CHECK(!second_acc.is_same(first_acc), fn,
              ": arguments 'second_acc' and 'first_acc' must be different tensors");
}

}  // namespace oba_ext
