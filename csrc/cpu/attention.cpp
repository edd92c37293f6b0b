// CPU kernels of the attention ops (SPEC §4): row block by row block.
//
// Each step takes a block of R query rows of every (batch, head) and all keys: the N×N
// score matrix is never formed, only R×N_k slices (O(N) extra memory per query row). Inside
// a block the products are ATen matmuls (BLAS), so the CPU path is as fast as the plain
// O(N²) twin for small N and stays within memory for large N. float32 / float64.
//
// Equations (S = s·QKᵀ + mask, A = softmax(S), lse = logsumexp(S), per query row i):
//   forward:  O = AV,  Ṡ = s(Q̇Kᵀ + QK̇ᵀ),  Ȧ = A⊙(Ṡ − rowsum(A⊙Ṡ)),  Ȯ = ȦV + AV̇
//   backward: A = exp(S − lse) (recomputed from the saved lse, like flash attention)
//     G_A = G_O Vᵀ, G_S = A⊙(G_A − δ_G), δ_G = rowsum(A⊙G_A)
//     C_A = C_O Vᵀ + G_O V̇ᵀ, C_S = A⊙(C_A − δ_C), δ_C = rowsum(A⊙C_A)
//       exact: C_S += Ȧ⊙(G_A − δ_G) − A⊙rowsum(Ȧ⊙G_A)
//     G_Q = s G_S K, C_Q = s(C_S K + G_S K̇)              (per block: rows are independent)
//     G_K += s G_Sᵀ Q, C_K += s(C_Sᵀ Q + G_Sᵀ Q̇), G_V += AᵀG_O, C_V += AᵀC_O + ȦᵀG_O
//                                                       (sums over the blocks' rows)
// A row whose keys are all masked has A = 0 (O = 0, lse = −inf, zero gradients).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../common/attention_checks.h"

namespace oba_ext {
namespace {

using attention::Shapes;
using attention::present;

constexpr double kInf = std::numeric_limits<double>::infinity();
// Score elements per block (all batches and heads): 2^21 doubles = 16 MB per temporary.
constexpr int64_t kBlockElems = int64_t(1) << 21;

int64_t row_block(const Shapes& s) {
  int64_t per_row = std::max<int64_t>(1, s.B * s.H * s.Nk);
  return std::max<int64_t>(1, std::min<int64_t>(s.Nq, kBlockElems / per_row));
}

at::Tensor acc(const at::Tensor& t, at::ScalarType a) { return t.to(a); }

at::Tensor opt_acc(const c10::optional<at::Tensor>& t, at::ScalarType a) {
  return present(t) ? t->to(a) : at::Tensor();
}

// S = s·Q_b Kᵀ + mask_b (−inf where masked / non-causal) for query rows [r0, r0 + R).
at::Tensor block_scores(const at::Tensor& qb, const at::Tensor& kT, const at::Tensor& mask,
                        bool is_causal, double scale, int64_t r0, int64_t R) {
  at::Tensor S = at::matmul(qb, kT).mul_(scale);
  if (mask.defined()) S.add_(mask.narrow(2, r0, R));
  if (is_causal) {
    const int64_t Nk = kT.size(-1);
    auto opts = at::TensorOptions().dtype(at::kLong);
    at::Tensor i = at::arange(r0, r0 + R, opts).unsqueeze(1);
    at::Tensor j = at::arange(0, Nk, opts).unsqueeze(0);
    S.masked_fill_(j.gt(i), -kInf);
  }
  return S;
}

// Ȧ = A⊙(Ṡ − rowsum(A⊙Ṡ)) for the block, or undefined when Q̇ = K̇ = 0.
at::Tensor block_a_dot(const at::Tensor& A, const at::Tensor& qb, const at::Tensor& qdb,
                       const at::Tensor& kT, const at::Tensor& kdT, double scale) {
  if (!qdb.defined() && !kdT.defined()) return at::Tensor();
  at::Tensor Sd = qdb.defined() ? at::matmul(qdb, kT) : at::matmul(qb, kdT);
  if (qdb.defined() && kdT.defined()) Sd.add_(at::matmul(qb, kdT));
  Sd.mul_(scale);
  at::Tensor r = (A * Sd).sum(-1, true);
  return Sd.sub_(r).mul_(A);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_two_stream_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const c10::optional<at::Tensor>& mask,
    bool is_causal, c10::optional<double> scale_opt) {
  const char* op = "attention_two_stream_forward";
  Shapes s = attention::check_qkv(op, q, k, v, q_dot, k_dot, v_dot);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32/float64, got ", q.scalar_type());
  const auto a = attention::acc_dtype(q.scalar_type());
  const double scale = attention::resolve_scale(scale_opt, s.D);
  at::Tensor madd = attention::additive_mask(op, mask, s, a, q.device());

  at::Tensor O = at::zeros({s.B, s.H, s.Nq, s.Dv}, q.options());
  at::Tensor Od = at::zeros_like(O);
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(a));
  if (O.numel() == 0 && lse.numel() == 0) return {O, Od, lse};
  if (s.Nk == 0) {  // no key at all: every row is empty
    lse.fill_(-kInf);
    return {O, Od, lse};
  }
  at::Tensor kT = k.transpose(-1, -2), vv = v;
  at::Tensor qd = opt_acc(q_dot, a), vd = opt_acc(v_dot, a);
  at::Tensor kdT = present(k_dot) ? k_dot->transpose(-1, -2) : at::Tensor();
  const int64_t R = row_block(s);
  for (int64_t r0 = 0; r0 < s.Nq; r0 += R) {
    const int64_t n = std::min(R, s.Nq - r0);
    at::Tensor qb = q.narrow(2, r0, n);
    at::Tensor S = block_scores(qb, kT, madd, is_causal, scale, r0, n);
    at::Tensor m = std::get<0>(S.max(-1, true));
    at::Tensor m_safe = at::where(m.isneginf(), at::zeros_like(m), m);
    at::Tensor A = S.sub_(m_safe).exp_();
    at::Tensor l = A.sum(-1, true);
    lse.narrow(2, r0, n).copy_((m + l.log()).squeeze(-1));
    A.div_(at::where(l.eq(0), at::ones_like(l), l));
    O.narrow(2, r0, n).copy_(at::matmul(A, vv));
    at::Tensor Ad = block_a_dot(A, qb, qd.defined() ? qd.narrow(2, r0, n) : at::Tensor(), kT,
                                kdT, scale);
    at::Tensor od;
    if (Ad.defined()) od = at::matmul(Ad, vv);
    if (vd.defined()) od = od.defined() ? od.add_(at::matmul(A, vd)) : at::matmul(A, vd);
    if (od.defined()) Od.narrow(2, r0, n).copy_(od);
  }
  return {O, Od, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_second_order_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const at::Tensor& G_O,
    const c10::optional<at::Tensor>& C_O, const c10::optional<at::Tensor>& mask, bool is_causal,
    c10::optional<double> scale_opt, const at::Tensor& lse, bool exact) {
  const char* op = "attention_second_order_backward";
  Shapes s = attention::check_qkv(op, q, k, v, q_dot, k_dot, v_dot);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32/float64, got ", q.scalar_type());
  attention::check_like(op, "G_O", G_O, q, {s.B, s.H, s.Nq, s.Dv});
  attention::check_opt(op, "C_O", C_O, q, {s.B, s.H, s.Nq, s.Dv});
  const auto a = attention::acc_dtype(q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.sizes() == at::IntArrayRef({s.B, s.H, s.Nq}), op,
              ": lse must have shape (B, H, N_q) = (", s.B, ", ", s.H, ", ", s.Nq, "), got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == a, op, ": lse must be ", a, " (as returned by "
              "attention_two_stream_forward), got ", lse.scalar_type());
  const double scale = attention::resolve_scale(scale_opt, s.D);
  at::Tensor madd = attention::additive_mask(op, mask, s, a, q.device());

  at::Tensor GQ = at::zeros_like(q, at::MemoryFormat::Contiguous);
  at::Tensor CQ = at::zeros_like(GQ);
  at::Tensor GK = at::zeros_like(k, at::MemoryFormat::Contiguous);
  at::Tensor CK = at::zeros_like(GK);
  at::Tensor GV = at::zeros_like(v, at::MemoryFormat::Contiguous);
  at::Tensor CV = at::zeros_like(GV);
  if (s.B * s.H * s.Nq * s.Nk == 0) return {GQ, GK, GV, CQ, CK, CV};

  at::Tensor kT = k.transpose(-1, -2), vT = v.transpose(-1, -2);
  at::Tensor qd = opt_acc(q_dot, a), kd = opt_acc(k_dot, a);
  at::Tensor kdT = kd.defined() ? kd.transpose(-1, -2) : at::Tensor();
  at::Tensor vdT = present(v_dot) ? v_dot->transpose(-1, -2) : at::Tensor();
  at::Tensor CO = opt_acc(C_O, a);
  // rows with no visible key have lse = −inf: shifting by +inf makes their A exactly 0
  at::Tensor lse_safe = at::where(lse.isneginf(), at::full_like(lse, kInf), lse).unsqueeze(-1);
  const int64_t R = row_block(s);
  for (int64_t r0 = 0; r0 < s.Nq; r0 += R) {
    const int64_t n = std::min(R, s.Nq - r0);
    at::Tensor qb = q.narrow(2, r0, n), gob = G_O.narrow(2, r0, n);
    at::Tensor qdb = qd.defined() ? qd.narrow(2, r0, n) : at::Tensor();
    at::Tensor A = block_scores(qb, kT, madd, is_causal, scale, r0, n)
                       .sub_(lse_safe.narrow(2, r0, n)).exp_();
    at::Tensor AT = A.transpose(-1, -2);
    at::Tensor Ad = block_a_dot(A, qb, qdb, kT, kdT, scale);

    at::Tensor GA = at::matmul(gob, vT);
    at::Tensor GAc = GA - (A * GA).sum(-1, true);  // G_A − δ_G
    at::Tensor GS = A * GAc;
    at::Tensor CA;
    if (CO.defined()) CA = at::matmul(CO.narrow(2, r0, n), vT);
    if (vdT.defined()) CA = CA.defined() ? CA.add_(at::matmul(gob, vdT)) : at::matmul(gob, vdT);
    at::Tensor CS = CA.defined() ? (CA - (A * CA).sum(-1, true)).mul_(A) : at::zeros_like(A);
    if (exact && Ad.defined()) {
      CS.add_(Ad * GAc).sub_(A * (Ad * GA).sum(-1, true));
    }
    at::Tensor GST = GS.transpose(-1, -2);

    GQ.narrow(2, r0, n).copy_(at::matmul(GS, k).mul_(scale));
    at::Tensor cq = at::matmul(CS, k);
    if (kd.defined()) cq.add_(at::matmul(GS, kd));
    CQ.narrow(2, r0, n).copy_(cq.mul_(scale));
    GK.add_(at::matmul(GST, qb).mul_(scale));
    at::Tensor ck = at::matmul(CS.transpose(-1, -2), qb);
    if (qdb.defined()) ck.add_(at::matmul(GST, qdb));
    CK.add_(ck.mul_(scale));
    GV.add_(at::matmul(AT, gob));
    if (CO.defined()) CV.add_(at::matmul(AT, CO.narrow(2, r0, n)));
    if (Ad.defined()) CV.add_(at::matmul(Ad.transpose(-1, -2), gob));
  }
  return {GQ, GK, GV, CQ, CK, CV};
}

}  // namespace

TORCH_LIBRARY_IMPL(oba_ext, CPU, m) {
  m.impl("attention_two_stream_forward", &attention_two_stream_forward_cpu);
  m.impl("attention_second_order_backward", &attention_second_order_backward_cpu);
}

}  // namespace oba_ext
