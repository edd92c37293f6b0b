// The fused elementwise row kernel of the attention ops (SPEC §4), shared by the CPU build and
// the CUDA build: every per-element and index computation is here, as __host__ __device__
// code, so the CPU tests execute exactly what the GPU runs.
//
// A row block (see attention_blocks.h) holds, per query row ρ of the block, N_k entries of up
// to four (rows, N_k) buffers produced by GEMMs:
//   s:  raw QKᵀ                      → A = softmax(s·raw + mask)         (in place)
//   sd: raw Q̇Kᵀ + QK̇ᵀ (or nullptr)   → Ȧ = A⊙(Ṡ − rowsum(A⊙Ṡ)), Ṡ = s·sd  (in place)
//   ga: G_O Vᵀ (backward)            → G_S = A⊙(G_A − δ_G)               (in place)
//   ca: C_O Vᵀ + G_O V̇ᵀ (or nullptr) → C_S = A⊙(C_A − δ_C)
//                                        [+ exact: Ȧ⊙(G_A − δ_G) − A·rowsum(Ȧ⊙G_A)]
// with δ_G = rowsum(A⊙G_A), δ_C = rowsum(A⊙C_A). Masked keys (additive −inf, or j > i when
// causal) and rows with no visible key get A = 0 (lse = −inf).
//
// Loop decomposition: a row is processed by `nl` lanes; lane l owns the columns
// j = l, l + nl, l + 2nl, ... and row sums are lane partial sums combined by an xor
// butterfly. The CUDA kernel runs one warp per row (nl = 32, the butterfly is __shfl_xor_sync);
// the CPU test ops run nl = 32 with the butterfly emulated lane by lane (EmulatedWarp below),
// i.e. the GPU's arithmetic in the GPU's order. (The public CPU ops compute the same
// mathematics as whole-block ATen ops, vectorized: csrc/cpu/attention.cpp.)
// All arithmetic is in acc_t (float32, or float64 for float64 inputs); buffers are scalar_t.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define OBA_HD __host__ __device__ __forceinline__
#define OBA_HD_TEMPLATE_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define OBA_HD inline
#define OBA_HD_TEMPLATE_CHECK_DISABLE
#endif

namespace oba_ext {
namespace attention {
namespace rows {

template <typename T>
OBA_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

OBA_HD float exp_(float x) { return ::expf(x); }
OBA_HD double exp_(double x) { return ::exp(x); }
OBA_HD float log_(float x) { return ::logf(x); }
OBA_HD double log_(double x) { return ::log(x); }

// Geometry of one row block: groups [g0, g0 + ng) of the B·H_kv (batch, key/value head)
// groups, and query rows [r0, r0 + R) of each of the group's `rep` query heads
// (rep = H / H_kv; grouped-query attention needs no repeated K/V). The block's buffers are
// (ng, rep·R, N_k), row-major: row ρ = (gl·rep + r)·R + il is query row r0 + il of query
// head hkv·rep + r of batch b, where g0 + gl = b·H_kv + hkv.
struct BlockGeom {
  int64_t H, Hkv, rep, Nq, Nk;
  int64_t g0, ng, r0, R;
};

struct RowIndex {
  int64_t b, h, i;  // batch, query head, query row
};

OBA_HD int64_t block_rows(const BlockGeom& g) { return g.ng * g.rep * g.R; }

OBA_HD RowIndex row_index(const BlockGeom& g, int64_t rho) {
  const int64_t il = rho % g.R;
  const int64_t gr = rho / g.R;  // gl·rep + r
  const int64_t r = gr % g.rep;
  const int64_t grp = g.g0 + gr / g.rep;
  const int64_t b = grp / g.Hkv, hkv = grp % g.Hkv;
  return {b, hkv * g.rep + r, g.r0 + il};
}

// Keys j < key_end are visible before the mask: all of them, or j <= i when causal.
OBA_HD int64_t key_end(const BlockGeom& g, int64_t i, bool causal) {
  return causal ? (i + 1 < g.Nk ? i + 1 : g.Nk) : g.Nk;
}

template <typename scalar_t, typename acc_t>
struct RowParams {
  scalar_t* s;   // (rows, N_k): raw QKᵀ → A
  scalar_t* sd;  // raw Q̇Kᵀ + QK̇ᵀ → Ȧ, or nullptr (Ṡ = 0)
  scalar_t* ga;  // backward: G_O Vᵀ → G_S
  scalar_t* ca;  // backward: C_A → C_S, or nullptr (no second stream wanted)
  acc_t* lse;    // (B, H, N_q) contiguous: the forward writes it, the backward reads it
  const acc_t* mask;  // additive mask, element (b, h, i, j) at b·msb + h·msh + i·msi + j·msj
  int64_t msb, msh, msi, msj;
  BlockGeom geom;
  acc_t scale;
  bool causal, exact;
};

// Per-row state: the row's offset in the block buffers and its (b, h, i).
struct Row {
  int64_t off, lse_at, mask_at, jend;
};

template <typename scalar_t, typename acc_t>
OBA_HD Row make_row(const RowParams<scalar_t, acc_t>& p, int64_t rho) {
  const BlockGeom& g = p.geom;
  const RowIndex ix = row_index(g, rho);
  Row r;
  r.off = rho * g.Nk;
  r.lse_at = (ix.b * g.H + ix.h) * g.Nq + ix.i;
  r.mask_at = ix.b * p.msb + ix.h * p.msh + ix.i * p.msi;
  r.jend = key_end(g, ix.i, p.causal);
  return r;
}

// S_ij = s·raw_ij + mask_ij, −inf beyond the causal bound.
template <typename scalar_t, typename acc_t>
OBA_HD acc_t score(const RowParams<scalar_t, acc_t>& p, const Row& r, int64_t j) {
  if (j >= r.jend) return neg_inf<acc_t>();
  acc_t S = p.scale * static_cast<acc_t>(p.s[r.off + j]);
  if (p.mask != nullptr) S += p.mask[r.mask_at + j * p.msj];
  return S;
}

// ---- lane passes (lane `l` of `nl`, columns j ≡ l mod nl) ----

// forward pass 1: the lane's max of S
template <typename scalar_t, typename acc_t>
OBA_HD acc_t fwd_lane_max(const RowParams<scalar_t, acc_t>& p, const Row& r, int l, int nl) {
  acc_t m = neg_inf<acc_t>();
  for (int64_t j = l; j < p.geom.Nk; j += nl) {
    const acc_t S = score(p, r, j);
    m = S > m ? S : m;
  }
  return m;
}

// forward pass 2: e_j = exp(S_j − m) written over raw (0 where masked); the lane's Σ e
template <typename scalar_t, typename acc_t>
OBA_HD acc_t fwd_lane_exp(const RowParams<scalar_t, acc_t>& p, const Row& r, acc_t m, int l,
                          int nl) {
  acc_t sum = 0;
  const bool dead = m == neg_inf<acc_t>();
  for (int64_t j = l; j < p.geom.Nk; j += nl) {
    const acc_t S = score(p, r, j);
    const acc_t e = (dead || S == neg_inf<acc_t>()) ? acc_t(0) : exp_(S - m);
    p.s[r.off + j] = static_cast<scalar_t>(e);
    sum += e;
  }
  return sum;
}

// forward pass 3: A_j = e_j · inv (inv = 1/Σe, 0 for a dead row); the lane's Σ A·Ṡ
template <typename scalar_t, typename acc_t>
OBA_HD acc_t fwd_lane_normalize(const RowParams<scalar_t, acc_t>& p, const Row& r, acc_t inv,
                                int l, int nl) {
  acc_t rs = 0;
  for (int64_t j = l; j < p.geom.Nk; j += nl) {
    const acc_t A = static_cast<acc_t>(p.s[r.off + j]) * inv;
    p.s[r.off + j] = static_cast<scalar_t>(A);
    if (p.sd != nullptr) rs += A * (p.scale * static_cast<acc_t>(p.sd[r.off + j]));
  }
  return rs;
}

// Ȧ_j = A_j (Ṡ_j − rsum) written over sd; returns the lane's Σ Ȧ·G_A when ga is given
// (the exact backward's ε), else 0.
template <typename scalar_t, typename acc_t>
OBA_HD acc_t lane_a_dot(const RowParams<scalar_t, acc_t>& p, const Row& r, acc_t rsum, int l,
                        int nl) {
  acc_t eps = 0;
  if (p.sd == nullptr) return eps;
  for (int64_t j = l; j < p.geom.Nk; j += nl) {
    const acc_t A = static_cast<acc_t>(p.s[r.off + j]);
    const acc_t Ad = A * (p.scale * static_cast<acc_t>(p.sd[r.off + j]) - rsum);
    p.sd[r.off + j] = static_cast<scalar_t>(Ad);
    if (p.ga != nullptr) eps += Ad * static_cast<acc_t>(p.ga[r.off + j]);
  }
  return eps;
}

// Row sums of the backward's pass 1.
template <typename acc_t>
struct BwdSums {
  acc_t dG, dC, r;
};

template <typename acc_t>
OBA_HD BwdSums<acc_t> operator+(const BwdSums<acc_t>& a, const BwdSums<acc_t>& b) {
  return {a.dG + b.dG, a.dC + b.dC, a.r + b.r};
}

// backward pass 1: A_j = exp(S_j − lse) written over raw (0 where masked or for a dead row);
// the lane's Σ A·G_A, Σ A·C_A, Σ A·Ṡ
template <typename scalar_t, typename acc_t>
OBA_HD BwdSums<acc_t> bwd_lane_sums(const RowParams<scalar_t, acc_t>& p, const Row& r, int l,
                                    int nl) {
  const acc_t lse = p.lse[r.lse_at];
  const bool dead = lse == neg_inf<acc_t>();
  BwdSums<acc_t> t{0, 0, 0};
  for (int64_t j = l; j < p.geom.Nk; j += nl) {
    const acc_t S = score(p, r, j);
    const acc_t A = (dead || S == neg_inf<acc_t>()) ? acc_t(0) : exp_(S - lse);
    p.s[r.off + j] = static_cast<scalar_t>(A);
    t.dG += A * static_cast<acc_t>(p.ga[r.off + j]);
    if (p.ca != nullptr) t.dC += A * static_cast<acc_t>(p.ca[r.off + j]);
    if (p.sd != nullptr) t.r += A * (p.scale * static_cast<acc_t>(p.sd[r.off + j]));
  }
  return t;
}

// backward pass 3: G_S, C_S written over ga, ca (each lane its own columns; no sums)
template <typename scalar_t, typename acc_t>
OBA_HD void bwd_lane_write(const RowParams<scalar_t, acc_t>& p, const Row& r,
                           const BwdSums<acc_t>& t, acc_t eps, int l, int nl) {
  const bool curv = p.exact && p.sd != nullptr;
  for (int64_t j = l; j < p.geom.Nk; j += nl) {
    const acc_t A = static_cast<acc_t>(p.s[r.off + j]);
    const acc_t gac = static_cast<acc_t>(p.ga[r.off + j]) - t.dG;
    p.ga[r.off + j] = static_cast<scalar_t>(A * gac);
    if (p.ca != nullptr) {
      acc_t cs = A * (static_cast<acc_t>(p.ca[r.off + j]) - t.dC);
      if (curv) cs += static_cast<acc_t>(p.sd[r.off + j]) * gac - A * eps;
      p.ca[r.off + j] = static_cast<scalar_t>(cs);
    }
  }
}

// ---- lane policies: how a row's lanes run and combine ----

template <typename T>
OBA_HD T max2(T a, T b) {
  return a > b ? a : b;
}

// 32 lanes run one after the other, combined by the xor butterfly of a warp all-reduce
// (offsets 16, 8, 4, 2, 1: x_l ← x_l ⊕ x_{l^o}); every lane ends with the same bits.
struct EmulatedWarp {
  static constexpr int n = 32;
  template <typename T, typename Op>
  static T butterfly(T (&v)[32], Op op) {
    for (int o = 16; o > 0; o >>= 1) {
      T w[32];
      for (int l = 0; l < 32; ++l) w[l] = op(v[l], v[l ^ o]);
      for (int l = 0; l < 32; ++l) v[l] = w[l];
    }
    return v[0];
  }
  template <typename F>
  auto sum(F&& f) const {
    decltype(f(0)) v[32];
    for (int l = 0; l < 32; ++l) v[l] = f(l);
    return butterfly(v, [](const decltype(f(0))& a, const decltype(f(0))& b) { return a + b; });
  }
  template <typename F>
  auto max(F&& f) const {
    decltype(f(0)) v[32];
    for (int l = 0; l < 32; ++l) v[l] = f(l);
    return butterfly(v, [](const decltype(f(0))& a, const decltype(f(0))& b) {
      return max2(a, b);
    });
  }
  template <typename F>
  void each(F&& f) const {
    for (int l = 0; l < 32; ++l) f(l);
  }
};

// ---- the row drivers: the passes and the all-reduces between them ----

OBA_HD_TEMPLATE_CHECK_DISABLE
template <typename Lanes, typename scalar_t, typename acc_t>
OBA_HD void forward_row(const Lanes& L, const RowParams<scalar_t, acc_t>& p, int64_t rho) {
  const Row r = make_row(p, rho);
  const int nl = Lanes::n;
  const acc_t m = L.max([&](int l) { return fwd_lane_max(p, r, l, nl); });
  const acc_t sum = L.sum([&](int l) { return fwd_lane_exp(p, r, m, l, nl); });
  const bool dead = sum == acc_t(0);
  const acc_t inv = dead ? acc_t(0) : acc_t(1) / sum;
  const acc_t rsum = L.sum([&](int l) { return fwd_lane_normalize(p, r, inv, l, nl); });
  // the lse store happens once per row (lane 0 on the GPU)
  L.each([&](int l) {
    if (l == 0) p.lse[r.lse_at] = dead ? neg_inf<acc_t>() : m + log_(sum);
  });
  if (p.sd != nullptr) L.each([&](int l) { lane_a_dot(p, r, rsum, l, nl); });
}

OBA_HD_TEMPLATE_CHECK_DISABLE
template <typename Lanes, typename scalar_t, typename acc_t>
OBA_HD void backward_row(const Lanes& L, const RowParams<scalar_t, acc_t>& p, int64_t rho) {
  const Row r = make_row(p, rho);
  const int nl = Lanes::n;
  const BwdSums<acc_t> t = L.sum([&](int l) { return bwd_lane_sums(p, r, l, nl); });
  acc_t eps = 0;
  if (p.sd != nullptr) {
    if (p.exact && p.ca != nullptr) {
      eps = L.sum([&](int l) { return lane_a_dot(p, r, t.r, l, nl); });
    } else {
      L.each([&](int l) { lane_a_dot(p, r, t.r, l, nl); });
    }
  }
  L.each([&](int l) { bwd_lane_write(p, r, t, eps, l, nl); });
}

}  // namespace rows
}  // namespace attention
}  // namespace oba_ext
