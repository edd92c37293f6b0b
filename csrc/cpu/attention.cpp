// CPU kernels of the attention ops (SPEC §4). The host routine is the one the CUDA kernels
// use (csrc/common/attention_blocks.h: row blocks over the (batch, key/value head) groups and
// the query rows, products as ATen GEMMs). The row pass (softmax, its tangent and the
// product-rule terms) is the mathematics of attention_rows.h as whole-block ATen ops
// (AtenRows below), which ATen vectorizes with the ISA it detects at run time.
// float32 / float64. Extra memory O(block), whatever N is (at N = 4096 a few MB).
//
// Two private ops run the same routine with a chosen block budget and, optionally, the row
// pass as the CUDA kernel's own __host__ __device__ functions in its decomposition (32 lanes
// combined by an emulated xor butterfly): the CPU tests use them to execute the CUDA
// kernel's arithmetic and block boundaries without a GPU.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <utility>

#include "../common/attention_blocks.h"

namespace oba_ext {
namespace {

using attention::present;
using attention::Shapes;

// What both CPU row passes share: float32/float64, arithmetic in the input dtype.
struct CpuRowsBase {
  template <typename T>
  using acc = at::opmath_type<T>;

  template <typename F>
  static void dispatch(at::ScalarType t, F&& f) {
    AT_DISPATCH_FLOATING_TYPES(t, "attention_cpu", [&] { f(attention::TypeTag<scalar_t>{}); });
  }
};

// The row pass of the CPU ops: the mathematics of attention_rows.h (see there) as ATen ops over
// the whole (ng, rep·R, N_k) block, in place over its buffers. ATen runs each op with the
// vector ISA it picks at run time (AVX2 / AVX-512 exp, products and row sums) and its
// intra-op threads; row sums are ATen's (a different rounding order than the GPU's lanes).
struct AtenRows : CpuRowsBase {
  at::Tensor tmp;  // block-sized scratch of the row sums

  // Σ_j a_ij b_ij as (ng, rows, 1)
  at::Tensor rowdot(const at::Tensor& a, const at::Tensor& b) {
    if (!tmp.defined() || tmp.sizes() != a.sizes() || tmp.scalar_type() != a.scalar_type()) {
      tmp = at::empty(a.sizes(), a.options());
    }
    at::mul_out(tmp, a, b);
    return tmp.sum(-1, true);
  }

  // raw → S = s·raw + mask, −inf for keys j > i when causal (attention_rows.h `score`)
  static void scores_(const attention::Common& c, const attention::rows::BlockGeom& g,
                      bool causal, const at::Tensor& raw) {
    raw.mul_(c.scale);
    const at::Tensor s4 = raw.view({g.ng, g.rep, g.R, g.Nk});
    if (c.madd.defined()) {
      // (B, H_kv, rep, N_q, N_k) view; the block's groups of one batch element are a range of
      // key/value heads
      const at::Tensor m5 = c.madd.view({c.s.B, g.Hkv, g.rep, g.Nq, g.Nk});
      for (int64_t gl = 0; gl < g.ng;) {
        const int64_t grp = g.g0 + gl, b = grp / g.Hkv, hkv = grp % g.Hkv;
        const int64_t cnt = std::min(g.ng - gl, g.Hkv - hkv);
        s4.narrow(0, gl, cnt).add_(m5.select(0, b).narrow(0, hkv, cnt).narrow(2, g.r0, g.R));
        gl += cnt;
      }
    }
    if (causal && g.r0 + 1 < g.Nk) {  // some key j > i (the first row hides the most)
      const auto lopt = raw.options().dtype(at::kLong);
      const at::Tensor hide =
          at::arange(g.Nk, lopt).gt(at::arange(g.r0, g.r0 + g.R, lopt).unsqueeze(1));
      s4.masked_fill_(hide, -std::numeric_limits<double>::infinity());
    }
  }

  // A, lse and Ȧ (forward_row)
  template <typename scalar_t, typename acc_t>
  void forward(const attention::Common& c, const attention::RowBlock<scalar_t, acc_t>& b) {
    const at::Tensor& S = b.s;
    scores_(c, b.p.geom, b.p.causal, S);
    const at::Tensor m = S.amax(-1, true);
    S.sub_(m.masked_fill(m.isneginf(), 0)).exp_();  // e = exp(S − m); 0 on a dead row
    const at::Tensor sum = S.sum(-1, true);
    b.lse.copy_((m + sum.log()).view(b.lse.sizes()));  // −inf on a dead row
    S.mul_(sum.reciprocal().masked_fill_(sum.eq(0), 0));  // A = e / Σe (0 on a dead row)
    if (b.sd.defined()) {
      b.sd.mul_(c.scale);  // Ṡ
      const at::Tensor rsum = rowdot(S, b.sd);
      b.sd.sub_(rsum).mul_(S);  // Ȧ = A⊙(Ṡ − rowsum(A⊙Ṡ))
    }
  }

  // A, Ȧ, G_S, C_S (backward_row)
  template <typename scalar_t, typename acc_t>
  void backward(const attention::Common& c, const attention::RowBlock<scalar_t, acc_t>& b) {
    const at::Tensor& S = b.s;
    scores_(c, b.p.geom, b.p.causal, S);
    const at::Tensor lse = b.lse.reshape({S.size(0), S.size(1), 1});
    // A = exp(S − lse); a dead row (lse = −inf) subtracts +inf: A = 0
    S.sub_(lse.masked_fill(lse.isneginf(), std::numeric_limits<double>::infinity())).exp_();
    const at::Tensor dG = rowdot(S, b.ga);
    const at::Tensor dC = b.ca.defined() ? rowdot(S, b.ca) : at::Tensor();
    at::Tensor eps;
    if (b.sd.defined()) {
      b.sd.mul_(c.scale);  // Ṡ
      const at::Tensor r = rowdot(S, b.sd);
      b.sd.sub_(r).mul_(S);  // Ȧ
      if (b.p.exact && b.ca.defined()) eps = rowdot(b.sd, b.ga);  // rowsum(Ȧ⊙G_A)
    }
    b.ga.sub_(dG);  // G_A − δ_G
    if (b.ca.defined()) {
      b.ca.sub_(dC).mul_(S);  // A⊙(C_A − δ_C)
      if (eps.defined()) b.ca.addcmul_(b.sd, b.ga).addcmul_(S, eps, -1);  // + Ȧ⊙(G_A − δ_G) − A·ε
    }
    b.ga.mul_(S);  // G_S = A⊙(G_A − δ_G)
  }
};

// The fused row functions of attention_rows.h in the CUDA kernel's decomposition (32 lanes
// per row, an emulated xor butterfly), rows in parallel: the tests' view of the GPU's
// arithmetic.
struct EmulatedWarpRows : CpuRowsBase {
  template <typename P, typename RowFn>
  static void each_row(const P& p, int64_t nrows, RowFn row) {
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, p.geom.Nk));
    at::parallel_for(0, nrows, grain, [&](int64_t b, int64_t e) {
      const attention::rows::EmulatedWarp L{};
      for (int64_t rho = b; rho < e; ++rho) row(L, p, rho);
    });
  }

  template <typename scalar_t, typename acc_t>
  void forward(const attention::Common&, const attention::RowBlock<scalar_t, acc_t>& b) {
    each_row(b.p, b.nrows(), [](const auto& L, const auto& p, int64_t rho) {
      attention::rows::forward_row(L, p, rho);
    });
  }

  template <typename scalar_t, typename acc_t>
  void backward(const attention::Common&, const attention::RowBlock<scalar_t, acc_t>& b) {
    each_row(b.p, b.nrows(), [](const auto& L, const auto& p, int64_t rho) {
      attention::rows::backward_row(L, p, rho);
    });
  }
};

Shapes check_cpu(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
                 const c10::optional<at::Tensor>& v_dot, int64_t block_elems) {
  Shapes s = attention::check_qkv(op, q, k, v, q_dot, k_dot, v_dot);
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32/float64, got ", q.scalar_type());
  TORCH_CHECK(block_elems >= 1, op, ": block_elems must be >= 1, got ", block_elems);
  return s;
}

template <typename Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const c10::optional<at::Tensor>& mask,
    bool is_causal, c10::optional<double> scale, int64_t block_elems) {
  const Shapes s = check_cpu(op, q, k, v, q_dot, k_dot, v_dot, block_elems);
  Rows rows;
  return attention::run_forward(rows, op, s, q, k, v, q_dot, k_dot, v_dot, mask, is_causal,
                                scale, block_elems);
}

template <typename Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_impl(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
              const c10::optional<at::Tensor>& v_dot, const at::Tensor& G_O,
              const c10::optional<at::Tensor>& C_O, const c10::optional<at::Tensor>& mask,
              bool is_causal, c10::optional<double> scale, const at::Tensor& lse, bool exact,
              int64_t block_elems) {
  const Shapes s = check_cpu(op, q, k, v, q_dot, k_dot, v_dot, block_elems);
  Rows rows;
  return attention::run_backward(rows, op, s, q, k, v, q_dot, k_dot, v_dot, G_O, C_O, mask,
                                 is_causal, scale, lse, exact, block_elems);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_two_stream_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const c10::optional<at::Tensor>& mask,
    bool is_causal, c10::optional<double> scale) {
  return forward_impl<AtenRows>("attention_two_stream_forward", q, k, v,
                                                   q_dot, k_dot, v_dot, mask, is_causal, scale,
                                                   attention::kCpuBlockElems);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_second_order_backward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const at::Tensor& G_O,
    const c10::optional<at::Tensor>& C_O, const c10::optional<at::Tensor>& mask, bool is_causal,
    c10::optional<double> scale, const at::Tensor& lse, bool exact) {
  return backward_impl<AtenRows>(
      "attention_second_order_backward", q, k, v, q_dot, k_dot, v_dot, G_O, C_O, mask,
      is_causal, scale, lse, exact, attention::kCpuBlockElems);
}

// _attention_forward_config / _attention_backward_config: the same ops with the block budget
// given and, with emulate_warp, the row pass in the CUDA kernel's 32-lane decomposition.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_config_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const c10::optional<at::Tensor>& mask,
    bool is_causal, c10::optional<double> scale, int64_t block_elems, bool emulate_warp) {
  const char* op = "_attention_forward_config";
  if (emulate_warp) {
    return forward_impl<EmulatedWarpRows>(op, q, k, v, q_dot, k_dot, v_dot, mask,
                                                       is_causal, scale, block_elems);
  }
  return forward_impl<AtenRows>(op, q, k, v, q_dot, k_dot, v_dot, mask,
                                                   is_causal, scale, block_elems);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_backward_config_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const at::Tensor& G_O,
    const c10::optional<at::Tensor>& C_O, const c10::optional<at::Tensor>& mask, bool is_causal,
    c10::optional<double> scale, const at::Tensor& lse, bool exact, int64_t block_elems,
    bool emulate_warp) {
  const char* op = "_attention_backward_config";
  if (emulate_warp) {
    return backward_impl<EmulatedWarpRows>(op, q, k, v, q_dot, k_dot, v_dot, G_O,
                                                        C_O, mask, is_causal, scale, lse, exact,
                                                        block_elems);
  }
  return backward_impl<AtenRows>(op, q, k, v, q_dot, k_dot, v_dot, G_O, C_O,
                                                    mask, is_causal, scale, lse, exact,
                                                    block_elems);
}

}  // namespace

TORCH_LIBRARY_IMPL(oba_ext, CPU, m) {
  m.impl("attention_two_stream_forward", &attention_two_stream_forward_cpu);
  m.impl("attention_second_order_backward", &attention_second_order_backward_cpu);
  m.impl("_attention_forward_config", &attention_forward_config_cpu);
  m.impl("_attention_backward_config", &attention_backward_config_cpu);
}

}  // namespace oba_ext
