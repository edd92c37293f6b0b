// Plain parameter structs passed by value to the kernels, and the host-side layout
// normalisation they rely on. Shared by csrc/cpu and csrc/cuda.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace oba_ext {

// channel_score_reduce views every input as one of two contiguous layouts:
//   channels_last == false: (outer, C, inner), element (o, k, i) at (o*C + k)*inner + i
//                           (NCHW, [N, C], [N, C, L] with channel_dim=1, ...)
//   channels_last == true:  (M, C) with C innermost, element (m, k) at m*C + k
//                           (NHWC memory of a channels-last NCHW tensor, [N, T, C] with
//                           channel_dim=-1, ...). Stored with outer = M, inner = 1.
template <typename scalar_t>
struct ChannelReduceParams {
  const scalar_t* a;
  const scalar_t* b;  // nullptr: b treated as 0
  const scalar_t* c;  // nullptr: c treated as 0
  const scalar_t* d;
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

// Where the per-channel results go: second[k * second_stride], first[k * first_stride];
// accumulate == true adds to what is there (the *_add_ variant). second is nullptr for the
// first-order reduction (channel_first_order_reduce).
template <typename out_t>
struct ChannelOutParams {
  out_t* second;
  out_t* first;
  int64_t second_stride;
  int64_t first_stride;
  bool accumulate;
};

// Inputs of channel_score_reduce after layout normalisation: all four share one contiguous layout.
// second == false: only first = Σ a⊙d is wanted (b and c are then undefined).
struct ChannelProblem {
  at::Tensor a, b, c, d;  // b, c undefined when absent (= 0)
  int64_t outer = 0, channels = 0, inner = 0;
  bool channels_last = false;
  bool second = true;
};

// Chooses the layout from `a`: channel-innermost when the channel dim is last, when inner == 1,
// or when `a` is not contiguous but `a` moved to (..., C) is (channels-last memory);
// otherwise (outer, C, inner). Tensors in another layout (or with arbitrary strides) are copied
// into the chosen one; tensors already in it are used without a copy.
inline ChannelProblem make_channel_problem(const at::Tensor& a, const std::optional<at::Tensor>& b,
                                           const std::optional<at::Tensor>& c, const at::Tensor& d,
                                           int64_t channel_dim, bool second = true) {
  ChannelProblem p;
  p.second = second;
  const int64_t ndim = a.dim();
  p.channels = a.size(channel_dim);
  p.outer = 1;
  p.inner = 1;
  for (int64_t i = 0; i < channel_dim; ++i) p.outer *= a.size(i);
  for (int64_t i = channel_dim + 1; i < ndim; ++i) p.inner *= a.size(i);
  const bool last = channel_dim == ndim - 1;
  // inner == 1: both layouts coincide, and the channel-innermost kernels are the efficient ones.
  p.channels_last = last || p.inner == 1 ||
                    (!a.is_contiguous() && a.movedim(channel_dim, -1).is_contiguous());
  auto norm = [&](const at::Tensor& t) {
    return p.channels_last ? t.movedim(channel_dim, -1).contiguous() : t.contiguous();
  };
  p.a = norm(a);
  if (second && b.has_value() && b->defined()) p.b = norm(*b);
  if (second && c.has_value() && c->defined()) p.c = norm(*c);
  p.d = norm(d);
  if (p.channels_last) {
    p.outer *= p.inner;
    p.inner = 1;
  }
  return p;
}

template <typename scalar_t>
ChannelReduceParams<scalar_t> channel_params(const ChannelProblem& p) {
  return {p.a.const_data_ptr<scalar_t>(),
          p.b.defined() ? p.b.const_data_ptr<scalar_t>() : nullptr,
          p.c.defined() ? p.c.const_data_ptr<scalar_t>() : nullptr,
          p.d.const_data_ptr<scalar_t>(),
          p.outer,
          p.channels,
          p.inner};
}

}  // namespace oba_ext
