// Argument checks and mask preparation shared by the CPU and CUDA attention kernels.
//
// Layout contract (SPEC §4; documented in oba_ext/ops/attention.py):
//   q, q_dot: (B, H, N_q, D)   k, k_dot: (B, H_kv, N_k, D)   v, v_dot: (B, H_kv, N_k, D_v)
//   (H_kv = H, or a divisor of H for grouped-query attention)
//   G_O, C_O: (B, H, N_q, D_v)  lse: (B, H, N_q) in the accumulation dtype (float32, or
//   float64 for float64 inputs)
//   mask: bool (True = attend) or additive float, broadcastable to (B, H, N_q, N_k).
// Tangents / C_O may be undefined (= zero). Any strides are accepted: the host routine
// (attention_blocks.h) takes views where the strides allow and contiguous copies elsewhere.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <limits>
#include <string>

namespace oba_ext {
namespace attention {

struct Shapes {
  int64_t B, H, Nq, Nk, D, Dv;
  int64_t Hkv;  // key/value heads: H for ordinary attention, a divisor of H for grouped-query
};

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& q, at::IntArrayRef shape) {
  TORCH_CHECK(t.dim() == 4 && t.sizes() == shape, op, ": ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(),
              ", got ", t.device());
}

inline void check_opt(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                      const at::Tensor& q, at::IntArrayRef shape) {
  if (t.has_value() && t->defined()) check_like(op, name, *t, q, shape);
}

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline Shapes check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const c10::optional<at::Tensor>& q_dot,
                        const c10::optional<at::Tensor>& k_dot,
                        const c10::optional<at::Tensor>& v_dot) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, N_q, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, H, N_k, D), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D (B, H, N_k, D_v), got shape ", v.sizes());
  TORCH_CHECK(q.is_floating_point(), op, ": q must be floating point, got ", q.scalar_type());
  Shapes s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3), k.size(1)};
  // grouped-query attention: k/v may have H_kv heads, H_kv dividing H (query head h reads
  // key/value head h / (H / H_kv))
  TORCH_CHECK(s.Hkv == s.H || (s.Hkv > 0 && s.H % s.Hkv == 0), op, ": k must have a number of "
              "heads dividing q's (", s.H, ", grouped-query attention), got shape ", k.sizes());
  check_like(op, "k", k, q, {s.B, s.Hkv, s.Nk, s.D});
  check_like(op, "v", v, q, {s.B, s.Hkv, s.Nk, s.Dv});
  check_opt(op, "q_dot", q_dot, q, {s.B, s.H, s.Nq, s.D});
  check_opt(op, "k_dot", k_dot, q, {s.B, s.Hkv, s.Nk, s.D});
  check_opt(op, "v_dot", v_dot, q, {s.B, s.Hkv, s.Nk, s.Dv});
  return s;
}

// G_O, C_O and lse of the backward (lse as returned by attention_two_stream_forward).
inline void check_backward_extras(const char* op, const Shapes& s, const at::Tensor& q,
                                  const at::Tensor& G_O, const c10::optional<at::Tensor>& C_O,
                                  const at::Tensor& lse) {
  check_like(op, "G_O", G_O, q, {s.B, s.H, s.Nq, s.Dv});
  check_opt(op, "C_O", C_O, q, {s.B, s.H, s.Nq, s.Dv});
  const auto a = acc_dtype(q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.sizes() == at::IntArrayRef({s.B, s.H, s.Nq}), op,
              ": lse must have shape (B, H, N_q) = (", s.B, ", ", s.H, ", ", s.Nq, "), got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == a, op, ": lse must be ", a, " (as returned by "
              "attention_two_stream_forward), got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": lse must be on q's device ", q.device(),
              ", got ", lse.device());
}

inline double resolve_scale(const c10::optional<double>& scale, int64_t D) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

// The mask as an additive tensor of dtype `acc` (0 = attend, -inf = masked), expanded (a
// stride-0 view, no copy of broadcast dims) to (B, H, N_q, N_k); undefined when absent.
inline at::Tensor additive_mask(const char* op, const c10::optional<at::Tensor>& mask,
                                const Shapes& s, at::ScalarType acc, const at::Device& dev) {
  if (!present(mask)) return at::Tensor();
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device() == dev, op, ": mask must be on q's device ", dev, ", got ", m.device());
  TORCH_CHECK(m.dim() <= 4, op, ": mask must be broadcastable to (B, H, N_q, N_k) = (", s.B, ", ",
              s.H, ", ", s.Nq, ", ", s.Nk, "), got shape ", m.sizes());
  std::vector<int64_t> target{s.B, s.H, s.Nq, s.Nk};
  for (int64_t i = 0; i < m.dim(); ++i) {
    int64_t d = m.size(m.dim() - 1 - i), t = target[3 - i];
    TORCH_CHECK(d == 1 || d == t, op, ": mask must be broadcastable to (B, H, N_q, N_k) = (",
                s.B, ", ", s.H, ", ", s.Nq, ", ", s.Nk, "), got shape ", m.sizes());
  }
  at::Tensor add;
  if (m.scalar_type() == at::kBool) {
    add = at::zeros(m.sizes(), m.options().dtype(acc))
              .masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
  } else {
    TORCH_CHECK(m.is_floating_point(), op, ": mask must be bool (True = attend) or a float "
                "additive mask, got ", m.scalar_type());
    add = m.to(acc);
  }
  return add.expand(target);
}

}  // namespace attention
}  // namespace oba_ext
