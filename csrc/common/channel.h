// Host-side entry logic of channel_score_reduce, channel_score_reduce_add_ and
// channel_first_order_reduce, shared by the CPU and CUDA files: argument checks, output
// allocation, empty inputs, layout normalisation, and the dispatcher registration of the three
// ops. Each backend only supplies
//   reduce_into(const ChannelProblem&, const at::Tensor& second, const at::Tensor& first,
//               bool accumulate)
// (second is undefined for the first-order reduction) and calls
// register_channel_ops<reduce_into>(m) from its TORCH_LIBRARY_IMPL block.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "channel_kernel.h"
#include "params.h"

namespace oba_ext {

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Checks a, b?, c?, d (same shape, dtype, device; float; at least 1-D) and returns the wrapped
// channel dim.
inline int64_t check_channel_inputs(const char* fn, const at::Tensor& a,
                                    const std::optional<at::Tensor>& b,
                                    const std::optional<at::Tensor>& c, const at::Tensor& d,
                                    int64_t channel_dim) {
  check_defined(a, fn, "a");
  check_defined(d, fn, "d");
  check_float(a, fn, "a");
  TORCH_CHECK(a.dim() >= 1, fn, ": argument 'a' must be at least 1-D, got a scalar");
  if (present(b)) check_like(*b, "b", a, "a", fn);
  if (present(c)) check_like(*c, "c", a, "a", fn);
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

// Calls f(ChannelTerms<HAS_B, HAS_C, SECOND>{}) for the terms the problem needs.
template <typename F>
void dispatch_channel_terms(const ChannelProblem& p, F&& f) {
  if (!p.second) {
    f(ChannelTerms<false, false, false>{});
  } else if (p.b.defined() && p.c.defined()) {
    f(ChannelTerms<true, true, true>{});
  } else if (p.b.defined()) {
    f(ChannelTerms<true, false, true>{});
  } else if (p.c.defined()) {
    f(ChannelTerms<false, true, true>{});
  } else {
    f(ChannelTerms<false, false, true>{});
  }
}

// channel_score_reduce: (second, first), each (C,) in channel_out_dtype(a). Every element of
// both outputs is written by the backend (torch::empty); only an empty input gives zeros.
template <typename ReduceInto>
std::tuple<at::Tensor, at::Tensor> channel_score_reduce_entry(
    const at::Tensor& a, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& c,
    const at::Tensor& d, int64_t channel_dim, ReduceInto&& reduce_into) {
  const char* fn = "channel_score_reduce";
  const int64_t dim = check_channel_inputs(fn, a, b, c, d, channel_dim);
  const auto opts = a.options().dtype(channel_out_dtype(a));
  const int64_t channels = a.size(dim);
  if (a.numel() == 0) return {at::zeros({channels}, opts), at::zeros({channels}, opts)};
  at::Tensor second = at::empty({channels}, opts), first = at::empty({channels}, opts);
  reduce_into(make_channel_problem(a, b, c, d, dim), second, first, /*accumulate=*/false);
  return {second, first};
}

// channel_score_reduce_add_: second_acc += second, first_acc += first.
template <typename ReduceInto>
void channel_score_reduce_add_entry(const at::Tensor& a, const std::optional<at::Tensor>& b,
                                    const std::optional<at::Tensor>& c, const at::Tensor& d,
                                    int64_t channel_dim, at::Tensor& second_acc,
                                    at::Tensor& first_acc, ReduceInto&& reduce_into) {
  const char* fn = "channel_score_reduce_add_";
  const int64_t dim = check_channel_inputs(fn, a, b, c, d, channel_dim);
  check_channel_accumulators(fn, a, dim, second_acc, first_acc);
  if (a.numel() == 0) return;
  reduce_into(make_channel_problem(a, b, c, d, dim), second_acc, first_acc, /*accumulate=*/true);
}

// channel_first_order_reduce: first = Σ a⊙d per channel, (C,) in channel_out_dtype(a).
template <typename ReduceInto>
at::Tensor channel_first_order_reduce_entry(const at::Tensor& a, const at::Tensor& d,
                                            int64_t channel_dim, ReduceInto&& reduce_into) {
  const char* fn = "channel_first_order_reduce";
  const int64_t dim = check_channel_inputs(fn, a, std::nullopt, std::nullopt, d, channel_dim);
  const auto opts = a.options().dtype(channel_out_dtype(a));
  const int64_t channels = a.size(dim);
  if (a.numel() == 0) return at::zeros({channels}, opts);
  at::Tensor first = at::empty({channels}, opts);
  reduce_into(make_channel_problem(a, std::nullopt, std::nullopt, d, dim, /*second=*/false),
              at::Tensor(), first, /*accumulate=*/false);
  return first;
}

// A backend's reduction of a non-empty, normalised problem (see the top of this file).
using ChannelReduceIntoFn = void (*)(const ChannelProblem& prob, const at::Tensor& second,
                                     const at::Tensor& first, bool accumulate);

// The three ops of the backend whose reduction is ReduceInto, as the dispatcher calls them.
template <ChannelReduceIntoFn ReduceInto>
struct ChannelBackendOps {
  static std::tuple<at::Tensor, at::Tensor> score_reduce(const at::Tensor& a,
                                                         const std::optional<at::Tensor>& b,
                                                         const std::optional<at::Tensor>& c,
                                                         const at::Tensor& d, int64_t channel_dim) {
    return channel_score_reduce_entry(a, b, c, d, channel_dim, ReduceInto);
  }
  static void score_reduce_add_(const at::Tensor& a, const std::optional<at::Tensor>& b,
                                const std::optional<at::Tensor>& c, const at::Tensor& d,
                                int64_t channel_dim, at::Tensor& second_acc, at::Tensor& first_acc) {
    channel_score_reduce_add_entry(a, b, c, d, channel_dim, second_acc, first_acc, ReduceInto);
  }
  static at::Tensor first_order_reduce(const at::Tensor& a, const at::Tensor& d,
                                       int64_t channel_dim) {
    return channel_first_order_reduce_entry(a, d, channel_dim, ReduceInto);
  }
};

// Registers channel_score_reduce, channel_score_reduce_add_ and channel_first_order_reduce
// (defined in csrc/registration.cpp) for the dispatch key of `m`.
template <ChannelReduceIntoFn ReduceInto>
void register_channel_ops(torch::Library& m) {
  using Ops = ChannelBackendOps<ReduceInto>;
  m.impl("channel_score_reduce", &Ops::score_reduce);
  m.impl("channel_score_reduce_add_", &Ops::score_reduce_add_);
  m.impl("channel_first_order_reduce", &Ops::first_order_reduce);
}

// The output pointers of a reduction (second may be undefined: first-order only).
template <typename out_t>
ChannelOutParams<out_t> channel_out_params(const at::Tensor& second, const at::Tensor& first,
                                           bool accumulate) {
  return {second.defined() ? second.data_ptr<out_t>() : nullptr, first.data_ptr<out_t>(),
          second.defined() ? second.stride(0) : 0, first.stride(0), accumulate};
}

}  // namespace oba_ext
