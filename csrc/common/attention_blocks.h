// The host routine of the attention ops (SPEC §4), one for both backends: row blocks whose
// products are ATen GEMMs (BLAS on the CPU, cuBLAS on the GPU: tensor cores for fp16/bf16,
// and TF32 for float32 when torch.backends.cuda.matmul.allow_tf32 is set) and whose row-wise
// softmax, softmax tangent and product-rule terms are one elementwise row pass per block
// (the mathematics of attention_rows.h). Only that row pass differs per backend: `Rows` is
//   struct { template <class scalar_t, class acc_t>
//            void forward(const Common&, const RowBlock<scalar_t, acc_t>&);
//            ... backward(...); static void dispatch(dtype, f) }
// (csrc/cuda/attention.cu: the fused kernel of attention_rows.h, one warp per row;
// csrc/cpu/attention.cpp: the same mathematics as whole-block ATen ops, vectorized by
// ATen's runtime ISA dispatch, and, for the tests, the fused row functions of
// attention_rows.h in the GPU's 32-lane decomposition).
//
// Blocking: the B·H_kv (batch, key/value head) groups and the N_q query rows are cut into
// blocks of ng groups × R rows (× the rep = H/H_kv query heads of each group) with
// ng·rep·R·N_k ≤ block_elems. Per block, with Q_b (ng, rep·R, D) and K_b (ng, N_k, D):
//   forward:  raw = Q_b K_bᵀ, raw_d = Q̇_b K_bᵀ + Q_b K̇_bᵀ → [rows] A, Ȧ, lse;
//             O_b = A V_b, Ȯ_b = Ȧ V_b + A V̇_b
//   backward: raw, raw_d as above; G_A = G_O V_bᵀ; C_A = C_O V_bᵀ + G_O V̇_bᵀ
//             → [rows] A, Ȧ, G_S, C_S;
//             G_Q = s G_S K_b, C_Q = s(C_S K_b + G_S K̇_b),
//             G_K += s G_Sᵀ Q_b, C_K += s(C_Sᵀ Q_b + G_Sᵀ Q̇_b),
//             G_V += AᵀG_O, C_V += AᵀC_O + ȦᵀG_O   (sums over the row blocks of a group)
// Extra memory: a few (ng, rep·R, N_k) buffers, O(block_elems), whatever N is.
// Grouped-query attention (k, v with H_kv | H heads): query head h reads key/value head
// h / rep; nothing is repeated, G_K/G_V sum over the group's query heads through the GEMMs.
// Outputs are written block by block (allocated uninitialised; each element written once, or
// accumulated with beta = 0 on a group's first row block).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "attention_checks.h"
#include "attention_rows.h"

namespace oba_ext {
namespace attention {

// Default block budget. CPU: 2^17 score elements (512 KB per float32 buffer; the backward
// holds four and a scratch), measured faster than 2^16 at N = 4096 (one thread: 15-25%, the
// GEMMs pack K and V once per block) and no slower at N = 65 / 1024. The GPU wants bigger
// blocks to fill the device with GEMM work: 2^24 elements (64 MB per float32 buffer).
constexpr int64_t kCpuBlockElems = int64_t(1) << 17;
constexpr int64_t kCudaBlockElems = int64_t(1) << 24;

struct Blocking {
  int64_t ng, R;
};

// ng·rep·R·N_k ≤ budget (at least one row): whole groups when one fits, else rows of one group.
inline Blocking choose_blocking(const Shapes& s, int64_t rep, int64_t budget) {
  const int64_t G = s.B * (s.H / rep);
  const int64_t per_group = std::max<int64_t>(1, rep * s.Nq * s.Nk);
  if (per_group <= budget) {
    return {std::max<int64_t>(1, std::min<int64_t>(G, budget / per_group)), s.Nq};
  }
  const int64_t per_row = std::max<int64_t>(1, rep * s.Nk);
  return {1, std::max<int64_t>(1, std::min<int64_t>(s.Nq, budget / per_row))};
}

// (B, H, N, X) → (B·H_kv, rep, N, X): a view, or a contiguous copy when the strides of B and
// H do not merge (e.g. q as a transposed view of a (B, N, H, D) projection).
inline at::Tensor grouped(const at::Tensor& t, int64_t Hkv) {
  return t.view({t.size(0), Hkv, t.size(1) / Hkv, t.size(2), t.size(3)}).flatten(0, 1);
}

inline at::Tensor opt_grouped(const c10::optional<at::Tensor>& t, int64_t Hkv) {
  return present(t) ? grouped(*t, Hkv) : at::Tensor();
}

// rows [r0, r0+R) of groups [g0, g0+ng) of a grouped (G, rep, N, X) tensor as (ng, rep·R, X)
// (a view when possible, else a block-sized copy)
inline at::Tensor rows_of(const at::Tensor& t, int64_t g0, int64_t ng, int64_t r0, int64_t R) {
  at::Tensor b = t.narrow(0, g0, ng).narrow(2, r0, R);
  return b.reshape({ng, b.size(1) * R, b.size(3)});
}

// keys of groups [g0, g0+ng) as (ng, N_k, X): a view of (G, 1, N_k, X)
inline at::Tensor keys_of(const at::Tensor& t, int64_t g0, int64_t ng) {
  return t.narrow(0, g0, ng).select(1, 0);
}

inline at::Tensor bmm_or_undef(const at::Tensor& a, const at::Tensor& b) {
  return (a.defined() && b.defined()) ? at::bmm(a, b) : at::Tensor();
}

// acc (+)= a @ b, or a @ b when acc is undefined
inline at::Tensor bmm_add(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined()) return acc;
  return acc.defined() ? acc.baddbmm_(a, b) : at::bmm(a, b);
}

// out = alpha·(a @ b) into a grouped output's block (view or copy-back)
inline void write_rows(const at::Tensor& out, int64_t g0, int64_t ng, int64_t r0, int64_t R,
                       const at::Tensor& val) {
  at::Tensor dst = out.narrow(0, g0, ng).narrow(2, r0, R);
  dst.copy_(val.view({ng, dst.size(1), R, dst.size(3)}));
}

// keys-side accumulation: dst(ng, N_k, X) = beta·dst + alpha·(a @ b)
inline void acc_keys(const at::Tensor& dst, const at::Tensor& a, const at::Tensor& b,
                     double beta, double alpha) {
  dst.baddbmm_(a, b, beta, alpha);
}

struct Common {
  Shapes s;
  int64_t Hkv, rep, G;
  double scale;
  at::Tensor madd;  // additive mask expanded to (B, H, N_q, N_k), acc dtype, or undefined
};

inline Common make_common(const char* op, const Shapes& s, const at::Tensor& q,
                          const c10::optional<at::Tensor>& mask,
                          const c10::optional<double>& scale) {
  Common c;
  c.s = s;
  c.Hkv = s.Hkv;
  c.rep = s.Hkv > 0 ? s.H / s.Hkv : 1;
  c.G = s.B * s.Hkv;
  c.scale = resolve_scale(scale, s.D);
  c.madd = additive_mask(op, mask, s, acc_dtype(q.scalar_type()), q.device());
  return c;
}

// A dtype as a value, for the generic lambdas of Rows::dispatch.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename scalar_t, typename acc_t>
rows::RowParams<scalar_t, acc_t> row_params(const Common& c, int64_t g0, int64_t ng, int64_t r0,
                                            int64_t R, bool causal) {
  rows::RowParams<scalar_t, acc_t> p{};
  p.geom = {c.s.H, c.Hkv, c.rep, c.s.Nq, c.s.Nk, g0, ng, r0, R};
  p.scale = static_cast<acc_t>(c.scale);
  p.causal = causal;
  if (c.madd.defined()) {
    p.mask = c.madd.data_ptr<acc_t>();
    p.msb = c.madd.stride(0);
    p.msh = c.madd.stride(1);
    p.msi = c.madd.stride(2);
    p.msj = c.madd.stride(3);
  }
  return p;
}

// One row block as a row pass sees it: the raw pointers of the fused kernels
// (attention_rows.h) and the same buffers as (ng, rep·R, N_k) tensors (undefined where the
// pointer is null), for a row pass built of ATen ops; lse as the block's (ng, rep, R) view of
// the (B, H, N_q) lse.
template <typename scalar_t, typename acc_t>
struct RowBlock {
  rows::RowParams<scalar_t, acc_t> p;
  at::Tensor s, sd, ga, ca, lse;
  int64_t nrows() const { return s.size(0) * s.size(1); }
};

// the block's (ng, rep, R) view of a contiguous (B, H, N_q) lse
inline at::Tensor lse_rows(const Common& c, const at::Tensor& lse, int64_t g0, int64_t ng,
                           int64_t r0, int64_t R) {
  return lse.view({c.G, c.rep, c.s.Nq}).narrow(0, g0, ng).narrow(2, r0, R);
}

template <typename scalar_t, typename Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_blocks(
    Rows& rows_impl, const Common& c, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const c10::optional<at::Tensor>& q_dot,
    const c10::optional<at::Tensor>& k_dot, const c10::optional<at::Tensor>& v_dot,
    bool is_causal, int64_t block_elems) {
  using acc_t = typename Rows::template acc<scalar_t>;
  const Shapes& s = c.s;
  const auto a = acc_dtype(q.scalar_type());
  at::Tensor O = at::empty({s.B, s.H, s.Nq, s.Dv}, q.options());
  const bool tan_s = present(q_dot) || present(k_dot);
  const bool tangent = tan_s || present(v_dot);
  // Ȯ = 0 without tangents: the only output that is filled rather than computed
  at::Tensor Od = tangent ? at::empty_like(O) : at::zeros_like(O);
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(a));
  if (s.B * s.H * s.Nq == 0) return {O, Od, lse};
  if (s.Nk == 0) {  // no key at all: every row is empty
    O.zero_();
    Od.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {O, Od, lse};
  }
  const at::Tensor qg = grouped(q, c.Hkv), kg = grouped(k, c.Hkv), vg = grouped(v, c.Hkv);
  const at::Tensor qdg = opt_grouped(q_dot, c.Hkv), kdg = opt_grouped(k_dot, c.Hkv);
  const at::Tensor vdg = opt_grouped(v_dot, c.Hkv);
  const at::Tensor Og = O.view({c.G, c.rep, s.Nq, s.Dv}), Odg = Od.view({c.G, c.rep, s.Nq, s.Dv});
  const Blocking bl = choose_blocking(s, c.rep, block_elems);
  for (int64_t g0 = 0; g0 < c.G; g0 += bl.ng) {
    const int64_t ng = std::min(bl.ng, c.G - g0);
    const at::Tensor kb = keys_of(kg, g0, ng), vb = keys_of(vg, g0, ng);
    const at::Tensor kbT = kb.transpose(1, 2);
    const at::Tensor kdbT = kdg.defined() ? keys_of(kdg, g0, ng).transpose(1, 2) : at::Tensor();
    const at::Tensor vdb = vdg.defined() ? keys_of(vdg, g0, ng) : at::Tensor();
    for (int64_t r0 = 0; r0 < s.Nq; r0 += bl.R) {
      const int64_t R = std::min(bl.R, s.Nq - r0);
      const at::Tensor qb = rows_of(qg, g0, ng, r0, R);
      at::Tensor raw = at::bmm(qb, kbT);
      at::Tensor raw_d;
      if (tan_s) {
        raw_d = bmm_or_undef(qdg.defined() ? rows_of(qdg, g0, ng, r0, R) : at::Tensor(), kbT);
        raw_d = bmm_add(raw_d, qb, kdbT);
      }
      RowBlock<scalar_t, acc_t> blk{row_params<scalar_t, acc_t>(c, g0, ng, r0, R, is_causal),
                                    raw, raw_d, at::Tensor(), at::Tensor(),
                                    lse_rows(c, lse, g0, ng, r0, R)};
      blk.p.s = raw.data_ptr<scalar_t>();
      blk.p.sd = raw_d.defined() ? raw_d.data_ptr<scalar_t>() : nullptr;
      blk.p.lse = lse.data_ptr<acc_t>();
      rows_impl.forward(c, blk);
      write_rows(Og, g0, ng, r0, R, at::bmm(raw, vb));
      if (tangent) {
        at::Tensor od = bmm_or_undef(raw_d, vb);
        od = bmm_add(od, raw, vdb);
        write_rows(Odg, g0, ng, r0, R, od);
      }
    }
  }
  return {O, Od, lse};
}

template <typename scalar_t, typename Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_blocks(Rows& rows_impl, const Common& c, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, const c10::optional<at::Tensor>& q_dot,
                const c10::optional<at::Tensor>& k_dot, const c10::optional<at::Tensor>& v_dot,
                const at::Tensor& G_O, const c10::optional<at::Tensor>& C_O,
                const at::Tensor& lse_in, bool is_causal, bool exact, int64_t block_elems) {
  using acc_t = typename Rows::template acc<scalar_t>;
  const Shapes& s = c.s;
  auto cont = at::MemoryFormat::Contiguous;
  at::Tensor GQ = at::empty_like(q, cont), CQ = at::empty_like(q, cont);
  at::Tensor GK = at::empty_like(k, cont), CK = at::empty_like(k, cont);
  at::Tensor GV = at::empty_like(v, cont), CV = at::empty_like(v, cont);
  if (s.B * s.H * s.Nq * s.Nk == 0) {
    for (auto* t : {&GQ, &CQ, &GK, &CK, &GV, &CV}) t->zero_();
    return {GQ, GK, GV, CQ, CK, CV};
  }
  // Ȧ (for C_V = ȦᵀG_O + ...) is nonzero when Ṡ is; C_S when C_A is (C_O or V̇ given) or,
  // for exact, when Ȧ is.
  const bool tan_s = present(q_dot) || present(k_dot);
  const bool has_ca = present(C_O) || present(v_dot);
  const bool need_cs = has_ca || (exact && tan_s);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor qg = grouped(q, c.Hkv), kg = grouped(k, c.Hkv), vg = grouped(v, c.Hkv);
  const at::Tensor qdg = opt_grouped(q_dot, c.Hkv), kdg = opt_grouped(k_dot, c.Hkv);
  const at::Tensor vdg = opt_grouped(v_dot, c.Hkv);
  const at::Tensor gog = grouped(G_O, c.Hkv), cog = opt_grouped(C_O, c.Hkv);
  auto out_g = [&](const at::Tensor& t) { return t.view({c.G, c.rep, t.size(2), t.size(3)}); };
  auto key_g = [&](const at::Tensor& t) { return t.view({c.G, t.size(2), t.size(3)}); };
  const at::Tensor GQg = out_g(GQ), CQg = out_g(CQ);
  const at::Tensor GKg = key_g(GK), CKg = key_g(CK), GVg = key_g(GV), CVg = key_g(CV);
  const Blocking bl = choose_blocking(s, c.rep, block_elems);
  for (int64_t g0 = 0; g0 < c.G; g0 += bl.ng) {
    const int64_t ng = std::min(bl.ng, c.G - g0);
    const at::Tensor kb = keys_of(kg, g0, ng), vb = keys_of(vg, g0, ng);
    const at::Tensor kbT = kb.transpose(1, 2), vbT = vb.transpose(1, 2);
    const at::Tensor kdb = kdg.defined() ? keys_of(kdg, g0, ng) : at::Tensor();
    const at::Tensor vdbT = vdg.defined() ? keys_of(vdg, g0, ng).transpose(1, 2) : at::Tensor();
    const at::Tensor gk = GKg.narrow(0, g0, ng), ck = CKg.narrow(0, g0, ng);
    const at::Tensor gv = GVg.narrow(0, g0, ng), cv = CVg.narrow(0, g0, ng);
    for (int64_t r0 = 0; r0 < s.Nq; r0 += bl.R) {
      const int64_t R = std::min(bl.R, s.Nq - r0);
      const double beta = r0 == 0 ? 0.0 : 1.0;  // a group's first row block initialises
      const at::Tensor qb = rows_of(qg, g0, ng, r0, R), gob = rows_of(gog, g0, ng, r0, R);
      const at::Tensor qdb = qdg.defined() ? rows_of(qdg, g0, ng, r0, R) : at::Tensor();
      const at::Tensor cob = cog.defined() ? rows_of(cog, g0, ng, r0, R) : at::Tensor();
      at::Tensor raw = at::bmm(qb, kbT);
      at::Tensor raw_d;  // → Ȧ
      if (tan_s) {
        raw_d = bmm_or_undef(qdb, kbT);
        raw_d = bmm_add(raw_d, qb, kdb.defined() ? kdb.transpose(1, 2) : at::Tensor());
      }
      at::Tensor ga = at::bmm(gob, vbT);
      at::Tensor ca;
      if (need_cs) {
        ca = bmm_or_undef(cob, vbT);
        ca = bmm_add(ca, gob, vdbT);
        if (!ca.defined()) ca = at::zeros_like(raw);  // exact with Ȧ but C_A = 0
      }
      RowBlock<scalar_t, acc_t> blk{row_params<scalar_t, acc_t>(c, g0, ng, r0, R, is_causal),
                                    raw, raw_d, ga, ca, lse_rows(c, lse, g0, ng, r0, R)};
      blk.p.s = raw.data_ptr<scalar_t>();
      blk.p.sd = raw_d.defined() ? raw_d.data_ptr<scalar_t>() : nullptr;
      blk.p.ga = ga.data_ptr<scalar_t>();
      blk.p.ca = ca.defined() ? ca.data_ptr<scalar_t>() : nullptr;
      blk.p.lse = const_cast<acc_t*>(lse.data_ptr<acc_t>());
      blk.p.exact = exact;
      rows_impl.backward(c, blk);
      // now raw = A, raw_d = Ȧ, ga = G_S, ca = C_S
      const at::Tensor& A = raw;
      const at::Tensor& GS = ga;
      const at::Tensor GST = GS.transpose(1, 2);
      write_rows(GQg, g0, ng, r0, R, at::bmm(GS, kb).mul_(c.scale));
      at::Tensor cq = need_cs ? at::bmm(ca, kb) : at::Tensor();
      cq = bmm_add(cq, GS, kdb);
      if (cq.defined()) {
        write_rows(CQg, g0, ng, r0, R, cq.mul_(c.scale));
      } else {
        CQg.narrow(0, g0, ng).narrow(2, r0, R).zero_();
      }
      acc_keys(gk, GST, qb, beta, c.scale);
      // C_K = s(C_Sᵀ Q + G_Sᵀ Q̇), C_V = AᵀC_O + ȦᵀG_O (zero terms skipped)
      double ck_beta = beta, cv_beta = beta;
      if (need_cs) {
        acc_keys(ck, ca.transpose(1, 2), qb, ck_beta, c.scale);
        ck_beta = 1.0;
      }
      if (qdb.defined()) {
        acc_keys(ck, GST, qdb, ck_beta, c.scale);
        ck_beta = 1.0;
      }
      if (ck_beta == 0.0) ck.zero_();
      acc_keys(gv, A.transpose(1, 2), gob, beta, 1.0);
      if (cob.defined()) {
        acc_keys(cv, A.transpose(1, 2), cob, cv_beta, 1.0);
        cv_beta = 1.0;
      }
      if (raw_d.defined()) {
        acc_keys(cv, raw_d.transpose(1, 2), gob, cv_beta, 1.0);
        cv_beta = 1.0;
      }
      if (cv_beta == 0.0) cv.zero_();
    }
  }
  return {GQ, GK, GV, CQ, CK, CV};
}

// The two ops' bodies for both backends (arguments already checked): Common from the
// arguments, then the blocks in q's dtype. `Rows::dispatch(dtype, f)` calls
// f(TypeTag<scalar_t>{}) for the dtypes its backend supports.
template <typename Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(
    Rows& rows_impl, const char* op, const Shapes& s, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const c10::optional<at::Tensor>& q_dot,
    const c10::optional<at::Tensor>& k_dot, const c10::optional<at::Tensor>& v_dot,
    const c10::optional<at::Tensor>& mask, bool is_causal, const c10::optional<double>& scale,
    int64_t block_elems) {
  const Common c = make_common(op, s, q, mask, scale);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  Rows::dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    out = forward_blocks<scalar_t>(rows_impl, c, q, k, v, q_dot, k_dot, v_dot, is_causal,
                                   block_elems);
  });
  return out;
}

template <typename Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    Rows& rows_impl, const char* op, const Shapes& s, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const c10::optional<at::Tensor>& q_dot,
    const c10::optional<at::Tensor>& k_dot, const c10::optional<at::Tensor>& v_dot,
    const at::Tensor& G_O, const c10::optional<at::Tensor>& C_O,
    const c10::optional<at::Tensor>& mask, bool is_causal, const c10::optional<double>& scale,
    const at::Tensor& lse, bool exact, int64_t block_elems) {
  check_backward_extras(op, s, q, G_O, C_O, lse);
  const Common c = make_common(op, s, q, mask, scale);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  Rows::dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    out = backward_blocks<scalar_t>(rows_impl, c, q, k, v, q_dot, k_dot, v_dot, G_O, C_O, lse,
                                    is_causal, exact, block_elems);
  });
  return out;
}

}  // namespace attention
}  // namespace oba_ext
