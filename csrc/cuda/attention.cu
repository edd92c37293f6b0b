// CUDA kernels of the attention ops (SPEC §4), flash-attention style: keys are streamed
// with an online softmax and nothing of size N_q×N_k is ever written to global memory.
//
// Work split: one warp per query row (forward, backward query side) or per key row
// (backward key side); the 32 lanes split the head dimension (lane owns d = lane + 32c,
// c < NC, so D, D_v <= 32·NC <= 256) and every q·k-style dot product is a warp all-reduce.
// Each output row is written by exactly one warp: no atomics, results are deterministic.
// Inputs fp32/fp64/fp16/bf16; all arithmetic and softmax statistics (lse, row stats) in
// float32 (float64 for fp64 inputs).
//
// Kernels (row i = query, j = key; s = scale; A_ij = exp(S_ij − lse_i)):
//   attn_fwd:     online softmax over j (p = e^{S−m}, W = Σp) with weighted Welford moments:
//                 O = Σpv/W, r = ΣpṠ/W, Ȯ = (Σp(Ṡ − r)v + Σpv̇)/W, lse = m + log W
//   attn_bwd_q:   pass 1 over j: row stats δ_G = Σ A·G_A, δ_C = Σ A·C_A, r = Σ A·Ṡ,
//                 ε = Σ A(Ṡ − r)G_A (= rowsum(Ȧ⊙G_A)), as weighted Welford means and
//                 co-moment; pass 2: G_Q = sΣ G_S k,
//                 C_Q = sΣ (C_S k + G_S k̇)
//   attn_bwd_kv:  per key j, over i: G_K = sΣ G_S q, C_K = sΣ (C_S q + G_S q̇), G_V = Σ A·G_O,
//                 C_V = Σ (A·C_O + Ȧ·G_O)
//   with G_A = G_O·v, C_A = C_O·v + G_O·v̇, Ṡ = s(q̇·k + q·k̇), Ȧ = A(Ṡ − r),
//   G_S = A(G_A − δ_G), C_S = A(C_A − δ_C) [+ exact: Ȧ(G_A − δ_G) − A·ε].
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../common/attention_checks.h"

namespace oba_ext {
namespace {

using attention::present;
using attention::Shapes;

constexpr int kWarps = 4;  // warps (rows) per block
constexpr int kMaxHeadDim = 256;

template <typename scalar_t>
struct AttnParams {
  using acc_t = at::opmath_type<scalar_t>;
  // inputs, contiguous (B, H, N, ·); optional ones are nullptr when zero
  const scalar_t *q, *k, *v, *qd, *kd, *vd, *go, *co;
  const acc_t* mask;  // additive, read through strides (0 for broadcast dims), or nullptr
  int64_t msb, msh, msi, msj;
  const acc_t* lse_in;  // (B, H, N_q), backward only
  // outputs
  scalar_t *o, *od;                  // forward
  acc_t* lse;                        // forward
  acc_t* stats;                      // (4, B, H, N_q): δ_G, δ_C, r, ε; backward
  scalar_t *gq, *cq, *gk, *ck, *gv, *cv;  // backward
  int64_t B, H, Nq, Nk, D, Dv;
  acc_t scale;
  bool causal, exact;
};

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return ::exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return ::log(x); }

// row[d] for the lane's columns d = lane + 32c (0 beyond n or when row is nullptr)
template <int NC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(const scalar_t* row, int64_t n, int lane, acc_t (&r)[NC]) {
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int64_t d = lane + 32 * c;
    r[c] = (row != nullptr && d < n) ? static_cast<acc_t>(row[d]) : acc_t(0);
  }
}

template <int NC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(scalar_t* row, int64_t n, int lane, const acc_t (&r)[NC]) {
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < n) row[d] = static_cast<scalar_t>(r[c]);
  }
}

template <int NC, typename acc_t>
__device__ __forceinline__ acc_t dot_part(const acc_t (&a)[NC], const acc_t (&b)[NC]) {
  acc_t s = 0;
#pragma unroll
  for (int c = 0; c < NC; ++c) s += a[c] * b[c];
  return s;
}

template <typename P>
__device__ __forceinline__ typename P::acc_t mask_at(const P& p, int64_t b, int64_t h, int64_t i,
                                                     int64_t j) {
  return p.mask == nullptr ? typename P::acc_t(0)
                           : p.mask[b * p.msb + h * p.msh + i * p.msi + j * p.msj];
}

template <typename scalar_t, int NC>
__global__ void __launch_bounds__(kWarps * 32) attn_fwd_kernel(const AttnParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t bh = blockIdx.x, i = int64_t(blockIdx.y) * kWarps + (threadIdx.x >> 5);
  if (i >= p.Nq) return;  // the whole warp leaves together: shuffles stay full-mask
  const int64_t b = bh / p.H, h = bh % p.H;
  const acc_t neg_inf = static_cast<acc_t>(-INFINITY);
  const int64_t qoff = (bh * p.Nq + i) * p.D, koff = bh * p.Nk * p.D, voff = bh * p.Nk * p.Dv;
  acc_t q[NC], qd[NC], kr[NC], kdr[NC];
  load_row<NC>(p.q + qoff, p.D, lane, q);
  load_row<NC>(p.qd ? p.qd + qoff : nullptr, p.D, lane, qd);
  const bool tan_s = p.qd != nullptr || p.kd != nullptr;
  // Online softmax with weighted (Welford) moments, weights p_j = e^{S_j − m}, W = Σp:
  //   mx = Σpṡ/W (= r), mv = Σpv/W (= O), cv = Σp(Ṡ − mx)(v − mv) (co-moment), ovd = Σp v̇.
  // A change of the running max m rescales W, cv and ovd by e^{m_old − m_new}; means stay.
  // The co-moment gives Σ_j A_ij(Ṡ_ij − r_i)v_j = cv/W without the cancellation of
  // Σ A Ṡ v − r Σ A v.
  acc_t m = neg_inf, W = 0, mx = 0, mv[NC], cv[NC], ovd[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) mv[c] = cv[c] = ovd[c] = 0;
  const int64_t jend = p.causal ? (i + 1 < p.Nk ? i + 1 : p.Nk) : p.Nk;
  for (int64_t j = 0; j < jend; ++j) {
    load_row<NC>(p.k + koff + j * p.D, p.D, lane, kr);
    acc_t s_part = dot_part<NC>(q, kr), sd_part = 0;
    if (tan_s) {
      load_row<NC>(p.kd ? p.kd + koff + j * p.D : nullptr, p.D, lane, kdr);
      sd_part = dot_part<NC>(qd, kr) + dot_part<NC>(q, kdr);
    }
    const acc_t S = p.scale * warp_sum(s_part) + mask_at(p, b, h, i, j);
    const acc_t Sd = tan_s ? p.scale * warp_sum(sd_part) : acc_t(0);
    if (S == neg_inf) continue;  // uniform across the warp
    const acc_t m_new = S > m ? S : m;
    const acc_t corr = dexp(m - m_new), e = dexp(S - m_new);  // corr = 0 on the first key
    W = W * corr + e;  // > 0 from the first visible key on (its e is 1)
    const acc_t f = e / W, dx = Sd - mx;
    mx += dx * f;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int64_t d = lane + 32 * c;
      const acc_t vv = d < p.Dv ? static_cast<acc_t>(p.v[voff + j * p.Dv + d]) : acc_t(0);
      const acc_t vdv = (p.vd && d < p.Dv) ? static_cast<acc_t>(p.vd[voff + j * p.Dv + d]) : acc_t(0);
      mv[c] += (vv - mv[c]) * f;
      cv[c] = cv[c] * corr + e * dx * (vv - mv[c]);
      ovd[c] = ovd[c] * corr + e * vdv;
    }
    m = m_new;
  }
  const int64_t ooff = (bh * p.Nq + i) * p.Dv;
  acc_t out[NC], outd[NC];
  if (W == acc_t(0)) {  // no visible key: A = 0
#pragma unroll
    for (int c = 0; c < NC; ++c) out[c] = outd[c] = 0;
    if (lane == 0) p.lse[bh * p.Nq + i] = neg_inf;
  } else {
    const acc_t inv = acc_t(1) / W;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      out[c] = mv[c];
      outd[c] = (cv[c] + ovd[c]) * inv;  // ȦV + AV̇
    }
    if (lane == 0) p.lse[bh * p.Nq + i] = m + dlog(W);
  }
  store_row<NC>(p.o + ooff, p.Dv, lane, out);
  store_row<NC>(p.od + ooff, p.Dv, lane, outd);
}

// The per-pair quantities both backward kernels need (all lanes hold the same values).
template <typename acc_t>
struct Pair {
  acc_t A, Sd, ga, ca;
};

template <int NC, typename P, typename acc_t>
__device__ __forceinline__ Pair<acc_t> pair_terms(const P& p, int64_t b, int64_t h, int64_t i,
                                                  int64_t j, acc_t lse_i, const acc_t (&q)[NC],
                                                  const acc_t (&qd)[NC], const acc_t (&k)[NC],
                                                  const acc_t (&kd)[NC], const acc_t (&go)[NC],
                                                  const acc_t (&co)[NC], const acc_t (&v)[NC],
                                                  const acc_t (&vd)[NC]) {
  const bool tan_s = p.qd != nullptr || p.kd != nullptr;
  acc_t s_part = dot_part<NC>(q, k);
  acc_t sd_part = tan_s ? dot_part<NC>(qd, k) + dot_part<NC>(q, kd) : acc_t(0);
  acc_t ga_part = dot_part<NC>(go, v);
  acc_t ca_part = dot_part<NC>(co, v) + dot_part<NC>(go, vd);  // zero rows when absent
  Pair<acc_t> r;
  const acc_t S = p.scale * warp_sum(s_part) + mask_at(p, b, h, i, j);
  r.Sd = tan_s ? p.scale * warp_sum(sd_part) : acc_t(0);
  r.ga = warp_sum(ga_part);
  r.ca = (p.co || p.vd) ? warp_sum(ca_part) : acc_t(0);
  // lse_i = −inf (no visible key) → A = 0; S = −inf (masked) → A = 0
  r.A = (lse_i == static_cast<acc_t>(-INFINITY)) ? acc_t(0) : dexp(S - lse_i);
  return r;
}

template <typename scalar_t, int NC>
__global__ void __launch_bounds__(kWarps * 32) attn_bwd_q_kernel(const AttnParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t bh = blockIdx.x, i = int64_t(blockIdx.y) * kWarps + (threadIdx.x >> 5);
  if (i >= p.Nq) return;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t qoff = (bh * p.Nq + i) * p.D, ooff = (bh * p.Nq + i) * p.Dv;
  const int64_t koff = bh * p.Nk * p.D, voff = bh * p.Nk * p.Dv, row = bh * p.Nq + i;
  const int64_t plane = p.B * p.H * p.Nq;
  acc_t q[NC], qd[NC], go[NC], co[NC], k[NC], kd[NC], v[NC], vd[NC];
  load_row<NC>(p.q + qoff, p.D, lane, q);
  load_row<NC>(p.qd ? p.qd + qoff : nullptr, p.D, lane, qd);
  load_row<NC>(p.go + ooff, p.Dv, lane, go);
  load_row<NC>(p.co ? p.co + ooff : nullptr, p.Dv, lane, co);
  const acc_t lse_i = p.lse_in[row];
  const int64_t jend = p.causal ? (i + 1 < p.Nk ? i + 1 : p.Nk) : p.Nk;
  auto load_key = [&](int64_t j) {
    load_row<NC>(p.k + koff + j * p.D, p.D, lane, k);
    load_row<NC>(p.kd ? p.kd + koff + j * p.D : nullptr, p.D, lane, kd);
    load_row<NC>(p.v + voff + j * p.Dv, p.Dv, lane, v);
    load_row<NC>(p.vd ? p.vd + voff + j * p.Dv : nullptr, p.Dv, lane, vd);
  };
  // pass 1: row statistics as weighted Welford means over the visible keys (weights A,
  // W = ΣA ≈ 1): r = ΣAṠ/W, δ_G = ΣA·G_A/W, δ_C = ΣA·C_A/W, and the co-moment
  // ε = Σ A(Ṡ − r)(G_A − δ_G) (= rowsum(Ȧ⊙G_A), as Σ A(Ṡ − r) = 0). Normalising by W makes
  // Σ_j G_S = 0 hold to rounding even where lse is off by an ulp, and avoids the cancellation
  // of Σ AṠG_A − r·δ_G; float32 errors measured 3-10x below plain running sums
  // (tests/test_attention_cuda_algorithm.py replays these recurrences).
  acc_t W = 0, r = 0, dG = 0, dC = 0, eps = 0;
  for (int64_t j = 0; j < jend; ++j) {
    load_key(j);
    const Pair<acc_t> t = pair_terms<NC>(p, b, h, i, j, lse_i, q, qd, k, kd, go, co, v, vd);
    if (t.A == acc_t(0)) continue;
    W += t.A;
    const acc_t f = t.A / W, dx = t.Sd - r;
    r += dx * f;
    dG += (t.ga - dG) * f;
    dC += (t.ca - dC) * f;
    eps += t.A * dx * (t.ga - dG);
  }
  if (lane == 0) {
    p.stats[row] = dG;
    p.stats[plane + row] = dC;
    p.stats[2 * plane + row] = r;
    p.stats[3 * plane + row] = eps;
  }
  // pass 2: G_Q, C_Q
  acc_t gq[NC], cq[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) gq[c] = cq[c] = 0;
  for (int64_t j = 0; j < jend; ++j) {
    load_key(j);
    const Pair<acc_t> t = pair_terms<NC>(p, b, h, i, j, lse_i, q, qd, k, kd, go, co, v, vd);
    if (t.A == acc_t(0)) continue;
    const acc_t Ad = t.A * (t.Sd - r);
    const acc_t GS = t.A * (t.ga - dG);
    acc_t CS = t.A * (t.ca - dC);
    if (p.exact) CS += Ad * (t.ga - dG) - t.A * eps;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      gq[c] += GS * k[c];
      cq[c] += CS * k[c] + GS * kd[c];
    }
  }
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    gq[c] *= p.scale;
    cq[c] *= p.scale;
  }
  store_row<NC>(p.gq + qoff, p.D, lane, gq);
  store_row<NC>(p.cq + qoff, p.D, lane, cq);
}

template <typename scalar_t, int NC>
__global__ void __launch_bounds__(kWarps * 32) attn_bwd_kv_kernel(const AttnParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t bh = blockIdx.x, j = int64_t(blockIdx.y) * kWarps + (threadIdx.x >> 5);
  if (j >= p.Nk) return;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t koff = (bh * p.Nk + j) * p.D, voff = (bh * p.Nk + j) * p.Dv;
  const int64_t plane = p.B * p.H * p.Nq;
  acc_t q[NC], qd[NC], go[NC], co[NC], k[NC], kd[NC], v[NC], vd[NC];
  load_row<NC>(p.k + koff, p.D, lane, k);
  load_row<NC>(p.kd ? p.kd + koff : nullptr, p.D, lane, kd);
  load_row<NC>(p.v + voff, p.Dv, lane, v);
  load_row<NC>(p.vd ? p.vd + voff : nullptr, p.Dv, lane, vd);
  acc_t gk[NC], ck[NC], gv[NC], cv[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) gk[c] = ck[c] = gv[c] = cv[c] = 0;
  // causal: query i sees key j iff j <= i
  for (int64_t i = p.causal ? j : 0; i < p.Nq; ++i) {
    const int64_t row = bh * p.Nq + i, qoff = row * p.D, ooff = row * p.Dv;
    load_row<NC>(p.q + qoff, p.D, lane, q);
    load_row<NC>(p.qd ? p.qd + qoff : nullptr, p.D, lane, qd);
    load_row<NC>(p.go + ooff, p.Dv, lane, go);
    load_row<NC>(p.co ? p.co + ooff : nullptr, p.Dv, lane, co);
    const Pair<acc_t> t = pair_terms<NC>(p, b, h, i, j, p.lse_in[row], q, qd, k, kd, go, co, v, vd);
    if (t.A == acc_t(0)) continue;
    const acc_t dG = p.stats[row], dC = p.stats[plane + row];
    const acc_t r = p.stats[2 * plane + row], eps = p.stats[3 * plane + row];
    const acc_t Ad = t.A * (t.Sd - r);
    const acc_t GS = t.A * (t.ga - dG);
    acc_t CS = t.A * (t.ca - dC);
    if (p.exact) CS += Ad * (t.ga - dG) - t.A * eps;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      gk[c] += GS * q[c];
      ck[c] += CS * q[c] + GS * qd[c];
      gv[c] += t.A * go[c];
      cv[c] += t.A * co[c] + Ad * go[c];
    }
  }
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    gk[c] *= p.scale;
    ck[c] *= p.scale;
  }
  store_row<NC>(p.gk + koff, p.D, lane, gk);
  store_row<NC>(p.ck + koff, p.D, lane, ck);
  store_row<NC>(p.gv + voff, p.Dv, lane, gv);
  store_row<NC>(p.cv + voff, p.Dv, lane, cv);
}

// NC = lanes' columns per row: 32·NC >= max(D, D_v)
template <typename F>
void dispatch_nc(int64_t width, F&& f) {
  if (width <= 32) f(std::integral_constant<int, 1>{});
  else if (width <= 64) f(std::integral_constant<int, 2>{});
  else if (width <= 96) f(std::integral_constant<int, 3>{});
  else if (width <= 128) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

template <typename scalar_t>
const scalar_t* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

at::Tensor opt_contig(const c10::optional<at::Tensor>& t) {
  return present(t) ? t->contiguous() : at::Tensor();
}

Shapes check_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
                  const c10::optional<at::Tensor>& v_dot) {
  Shapes s = attention::check_qkv(op, q, k, v, q_dot, k_dot, v_dot);
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got ", q.device());
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": q must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(s.D <= kMaxHeadDim && s.Dv <= kMaxHeadDim, op, ": head dims D = ", s.D,
              " and D_v = ", s.Dv, " must be <= ", kMaxHeadDim);
  TORCH_CHECK(s.B * s.H <= INT32_MAX, op, ": B*H = ", s.B * s.H, " is too large");
  TORCH_CHECK((std::max(s.Nq, s.Nk) + kWarps - 1) / kWarps <= 65535, op,
              ": sequence lengths N_q = ", s.Nq, ", N_k = ", s.Nk, " must be <= ", 65535 * kWarps);
  return s;
}

template <typename scalar_t>
void fill_common(AttnParams<scalar_t>& p, const Shapes& s, const at::Tensor& q,
                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& qd,
                 const at::Tensor& kd, const at::Tensor& vd, const at::Tensor& madd, double scale,
                 bool causal) {
  using acc_t = at::opmath_type<scalar_t>;
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  p.v = v.data_ptr<scalar_t>();
  p.qd = opt_ptr<scalar_t>(qd);
  p.kd = opt_ptr<scalar_t>(kd);
  p.vd = opt_ptr<scalar_t>(vd);
  p.mask = madd.defined() ? madd.data_ptr<acc_t>() : nullptr;
  p.msb = madd.defined() ? madd.stride(0) : 0;
  p.msh = madd.defined() ? madd.stride(1) : 0;
  p.msi = madd.defined() ? madd.stride(2) : 0;
  p.msj = madd.defined() ? madd.stride(3) : 0;
  p.B = s.B; p.H = s.H; p.Nq = s.Nq; p.Nk = s.Nk; p.D = s.D; p.Dv = s.Dv;
  p.scale = static_cast<acc_t>(scale);
  p.causal = causal;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_two_stream_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const c10::optional<at::Tensor>& mask,
    bool is_causal, c10::optional<double> scale_opt) {
  const char* op = "attention_two_stream_forward";
  const Shapes s = check_cuda(op, q_in, k_in, v_in, q_dot, k_dot, v_dot);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto acc = attention::acc_dtype(q_in.scalar_type());
  const double scale = attention::resolve_scale(scale_opt, s.D);
  const at::Tensor madd = attention::additive_mask(op, mask, s, acc, q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor qd = opt_contig(q_dot), kd = opt_contig(k_dot), vd = opt_contig(v_dot);
  at::Tensor O = at::empty({s.B, s.H, s.Nq, s.Dv}, q.options());
  at::Tensor Od = at::empty_like(O);
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(acc));
  if (s.B * s.H * s.Nq == 0) return {O, Od, lse};
  const dim3 grid(static_cast<unsigned>(s.B * s.H), static_cast<unsigned>((s.Nq + kWarps - 1) / kWarps));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "attention_two_stream_forward", [&] {
    AttnParams<scalar_t> p{};
    fill_common(p, s, q, k, v, qd, kd, vd, madd, scale, is_causal);
    p.o = O.data_ptr<scalar_t>();
    p.od = Od.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<at::opmath_type<scalar_t>>();
    dispatch_nc(std::max(s.D, s.Dv), [&](auto nc) {
      attn_fwd_kernel<scalar_t, decltype(nc)::value><<<grid, kWarps * 32, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {O, Od, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_second_order_backward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const at::Tensor& G_O,
    const c10::optional<at::Tensor>& C_O, const c10::optional<at::Tensor>& mask, bool is_causal,
    c10::optional<double> scale_opt, const at::Tensor& lse_in, bool exact) {
  const char* op = "attention_second_order_backward";
  const Shapes s = check_cuda(op, q_in, k_in, v_in, q_dot, k_dot, v_dot);
  attention::check_like(op, "G_O", G_O, q_in, {s.B, s.H, s.Nq, s.Dv});
  attention::check_opt(op, "C_O", C_O, q_in, {s.B, s.H, s.Nq, s.Dv});
  const auto acc = attention::acc_dtype(q_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.sizes() == at::IntArrayRef({s.B, s.H, s.Nq}), op,
              ": lse must have shape (B, H, N_q) = (", s.B, ", ", s.H, ", ", s.Nq, "), got ",
              lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == acc, op, ": lse must be ", acc, " (as returned by "
              "attention_two_stream_forward), got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.device() == q_in.device(), op, ": lse must be on q's device ", q_in.device(),
              ", got ", lse_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const double scale = attention::resolve_scale(scale_opt, s.D);
  const at::Tensor madd = attention::additive_mask(op, mask, s, acc, q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor qd = opt_contig(q_dot), kd = opt_contig(k_dot), vd = opt_contig(v_dot);
  const at::Tensor go = G_O.contiguous(), co = opt_contig(C_O), lse = lse_in.contiguous();
  at::Tensor GQ = at::zeros_like(q), CQ = at::zeros_like(q);
  at::Tensor GK = at::zeros_like(k), CK = at::zeros_like(k);
  at::Tensor GV = at::zeros_like(v), CV = at::zeros_like(v);
  if (s.B * s.H * s.Nq * s.Nk == 0) return {GQ, GK, GV, CQ, CK, CV};
  at::Tensor stats = at::empty({4, s.B, s.H, s.Nq}, q.options().dtype(acc));
  const unsigned bh = static_cast<unsigned>(s.B * s.H);
  const dim3 grid_q(bh, static_cast<unsigned>((s.Nq + kWarps - 1) / kWarps));
  const dim3 grid_k(bh, static_cast<unsigned>((s.Nk + kWarps - 1) / kWarps));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "attention_second_order_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AttnParams<scalar_t> p{};
    fill_common(p, s, q, k, v, qd, kd, vd, madd, scale, is_causal);
    p.go = go.data_ptr<scalar_t>();
    p.co = opt_ptr<scalar_t>(co);
    p.lse_in = lse.data_ptr<acc_t>();
    p.stats = stats.data_ptr<acc_t>();
    p.gq = GQ.data_ptr<scalar_t>(); p.cq = CQ.data_ptr<scalar_t>();
    p.gk = GK.data_ptr<scalar_t>(); p.ck = CK.data_ptr<scalar_t>();
    p.gv = GV.data_ptr<scalar_t>(); p.cv = CV.data_ptr<scalar_t>();
    p.exact = exact;
    dispatch_nc(std::max(s.D, s.Dv), [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      // the key-side kernel reads the row stats the query-side kernel writes (same stream)
      attn_bwd_q_kernel<scalar_t, NC><<<grid_q, kWarps * 32, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      attn_bwd_kv_kernel<scalar_t, NC><<<grid_k, kWarps * 32, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {GQ, GK, GV, CQ, CK, CV};
}

}  // namespace

TORCH_LIBRARY_IMPL(oba_ext, CUDA, m) {
  m.impl("attention_two_stream_forward", &attention_two_stream_forward_cuda);
  m.impl("attention_second_order_backward", &attention_second_order_backward_cuda);
}

}  // namespace oba_ext
