// Named argument checks shared by every host entry point (CPU and CUDA).
// Every message names the op and the argument, and says what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace oba_ext {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// `fn` is the op name, `name` the argument name, e.g. check_defined(a, "channel_score_reduce", "a").
inline void check_defined(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.defined(), fn, ": argument '", name, "' is an undefined tensor");
}

inline void check_float(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), fn, ": argument '", name,
              "' must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_dim_in(const at::Tensor& t, int64_t lo, int64_t hi, const char* fn,
                         const char* name) {
  TORCH_CHECK(t.dim() >= lo && t.dim() <= hi, fn, ": argument '", name, "' must have ", lo,
              " to ", hi, " dimensions, got shape ", t.sizes());
}

// `t` must match `ref` in shape, dtype and device.
inline void check_like(const at::Tensor& t, const std::string& name, const at::Tensor& ref,
                       const char* ref_name, const char* fn) {
  TORCH_CHECK(t.sizes() == ref.sizes(), fn, ": argument '", name, "' must have the shape of '",
              ref_name, "' ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": argument '", name,
              "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), fn, ": argument '", name, "' must be on the device of '",
              ref_name, "' (", ref.device(), "), got ", t.device());
}

inline void check_same_dtype_device(const at::Tensor& t, const std::string& name,
                                    const at::Tensor& ref, const char* ref_name, const char* fn) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": argument '", name,
              "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), fn, ": argument '", name, "' must be on the device of '",
              ref_name, "' (", ref.device(), "), got ", t.device());
}

// Wraps a possibly negative dim into [0, ndim) with a named error.
inline int64_t wrap_dim_named(int64_t dim, int64_t ndim, const char* fn, const char* name) {
  TORCH_CHECK(dim >= -ndim && dim < ndim, fn, ": argument '", name, "' = ", dim,
              " is out of range for a tensor with ", ndim, " dimensions (expected ", -ndim, "..",
              ndim - 1, ")");
  return dim < 0 ? dim + ndim : dim;
}

// Accumulator buffers of the in-place variants: 1-D, `size` long, float32/float64.
inline void check_accumulator(const at::Tensor& acc, int64_t size, const at::Tensor& ref,
                              const char* fn, const char* name) {
  check_defined(acc, fn, name);
  TORCH_CHECK(acc.dim() == 1 && acc.size(0) == size, fn, ": argument '", name,
              "' must be 1-D of length ", size, " (the channel count), got shape ", acc.sizes());
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble, fn,
              ": argument '", name, "' must be float32 or float64, got ", acc.scalar_type());
  TORCH_CHECK(acc.device() == ref.device(), fn, ": argument '", name,
              "' must be on the device of the inputs (", ref.device(), "), got ", acc.device());
}

inline std::string list_item(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

}  // namespace oba_ext
