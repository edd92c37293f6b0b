// CPU kernels of channel_score_reduce(_add_) (SPEC §5 structured scores):
//   second[k] = Σ a⊙(b − d) + c⊙d,   first[k] = Σ a⊙d,
// summed over every dim but channel_dim. Accumulates in float64. Deterministic: the work is cut
// into a fixed number of chunks that depends on the shape only (not on the thread count), and the
// chunk partials are added in chunk order.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/channel.h"
#include "../common/dispatch.h"
#include "../common/params.h"

namespace oba_ext {
namespace {

constexpr int64_t kTaskElems = int64_t(1) << 15;  // elements per task (~128 KiB of fp32 per input)
constexpr int64_t kMaxChunks = 64;

struct Chunking {
  int64_t rows_per_chunk;
  int64_t chunks;
};

// Splits `rows` rows of `row_elems` elements into at most kMaxChunks chunks of ~kTaskElems.
Chunking chunk_rows(int64_t rows, int64_t row_elems) {
  int64_t per = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, row_elems));
  int64_t chunks = (rows + per - 1) / per;
  if (chunks > kMaxChunks) {
    chunks = kMaxChunks;
    per = (rows + chunks - 1) / chunks;
    chunks = (rows + per - 1) / per;
  }
  return {per, std::max<int64_t>(chunks, 1)};
}

// Σ over one contiguous span of n elements with kLanes independent float64 accumulators (the
// lane loop vectorises; the order is fixed so the result is reproducible).
constexpr int kLanes = 8;

template <typename scalar_t, bool HAS_B>
inline void span_sums(const scalar_t* a, const scalar_t* b, const scalar_t* c, const scalar_t* d,
                      int64_t n, double& second, double& first) {
  double x[kLanes] = {0}, y[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 8
    for (int u = 0; u < kLanes; ++u) {
      const double av = static_cast<double>(a[i + u]);
      const double bv = HAS_B ? static_cast<double>(b[i + u]) : 0.0;
      const double cv = static_cast<double>(c[i + u]);
      const double dv = static_cast<double>(d[i + u]);
      x[u] += av * (bv - dv) + cv * dv;
      y[u] += av * dv;
    }
  }
  double sx = 0.0, sy = 0.0;
  for (int u = 0; u < kLanes; ++u) {
    sx += x[u];
    sy += y[u];
  }
  for (; i < n; ++i) {
    const double av = static_cast<double>(a[i]);
    const double bv = HAS_B ? static_cast<double>(b[i]) : 0.0;
    const double cv = static_cast<double>(c[i]);
    const double dv = static_cast<double>(d[i]);
    sx += av * (bv - dv) + cv * dv;
    sy += av * dv;
  }
  second += sx;
  first += sy;
}

// Layout (outer, C, inner). Task (row chunk j, channel block q) streams rows [o0, o1) of the
// contiguous channel block [k0, k1) — sequential memory, ~kTaskElems per task — so both a
// large `outer` and a large `C` give parallel work. partial[(j*C + k)*2 + {0: second, 1: first}].
// (Measured on (64, 256, 16, 16) fp32: one task per channel, striding over rows, ran at half
// the bandwidth of this order.)
template <typename scalar_t, bool HAS_B>
std::vector<double> reduce_rows(const ChannelReduceParams<scalar_t>& p) {
  const int64_t C = p.channels, inner = p.inner;
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(C, kTaskElems / std::max<int64_t>(1, inner)));
  const int64_t nblocks = (C + block - 1) / block;
  const Chunking ch = chunk_rows(p.outer, block * inner);
  std::vector<double> partial(static_cast<size_t>(ch.chunks * C * 2), 0.0);
  at::parallel_for(0, ch.chunks * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> s2(block), s1(block);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / nblocks, q = t % nblocks;
      const int64_t k0 = q * block, k1 = std::min(C, k0 + block);
      const int64_t o0 = j * ch.rows_per_chunk, o1 = std::min(p.outer, o0 + ch.rows_per_chunk);
      std::fill(s2.begin(), s2.end(), 0.0);
      std::fill(s1.begin(), s1.end(), 0.0);
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t base = (o * C + k) * inner;
          span_sums<scalar_t, HAS_B>(p.a + base, HAS_B ? p.b + base : nullptr, p.c + base,
                                     p.d + base, inner, s2[k - k0], s1[k - k0]);
        }
      }
      for (int64_t k = k0; k < k1; ++k) {
        partial[(j * C + k) * 2] = s2[k - k0];
        partial[(j * C + k) * 2 + 1] = s1[k - k0];
      }
    }
  });
  return partial;
}

// Layout (M, C) with C innermost: chunk j sums its rows into per-channel vectors (the inner loop
// runs over contiguous channels and vectorises). partial[(j*C + k)*2 + {0, 1}].
template <typename scalar_t, bool HAS_B>
std::vector<double> reduce_cols(const ChannelReduceParams<scalar_t>& p) {
  const int64_t C = p.channels, M = p.outer;
  const Chunking ch = chunk_rows(M, C);
  std::vector<double> partial(static_cast<size_t>(ch.chunks * C * 2), 0.0);
  at::parallel_for(0, ch.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> s2(C), s1(C);
    for (int64_t j = begin; j < end; ++j) {
      std::fill(s2.begin(), s2.end(), 0.0);
      std::fill(s1.begin(), s1.end(), 0.0);
      const int64_t m0 = j * ch.rows_per_chunk, m1 = std::min(M, m0 + ch.rows_per_chunk);
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* a = p.a + m * C;
        const scalar_t* b = HAS_B ? p.b + m * C : nullptr;
        const scalar_t* c = p.c + m * C;
        const scalar_t* d = p.d + m * C;
        double* __restrict__ x = s2.data();
        double* __restrict__ y = s1.data();
        for (int64_t k = 0; k < C; ++k) {
          const double av = static_cast<double>(a[k]);
          const double bv = HAS_B ? static_cast<double>(b[k]) : 0.0;
          const double cv = static_cast<double>(c[k]);
          const double dv = static_cast<double>(d[k]);
          x[k] += av * (bv - dv) + cv * dv;
          y[k] += av * dv;
        }
      }
      for (int64_t k = 0; k < C; ++k) {
        partial[(j * C + k) * 2] = s2[k];
        partial[(j * C + k) * 2 + 1] = s1[k];
      }
    }
  });
  return partial;
}

template <typename out_t>
void write_out(const std::vector<double>& partial, int64_t C, const ChannelOutParams<out_t>& out) {
  const int64_t chunks = static_cast<int64_t>(partial.size()) / (2 * C);
  for (int64_t k = 0; k < C; ++k) {
    double s2 = 0.0, s1 = 0.0;
    for (int64_t j = 0; j < chunks; ++j) {
      s2 += partial[(j * C + k) * 2];
      s1 += partial[(j * C + k) * 2 + 1];
    }
    out_t* o2 = out.second + k * out.second_stride;
    out_t* o1 = out.first + k * out.first_stride;
    *o2 = out.accumulate ? static_cast<out_t>(*o2 + static_cast<out_t>(s2)) : static_cast<out_t>(s2);
    *o1 = out.accumulate ? static_cast<out_t>(*o1 + static_cast<out_t>(s1)) : static_cast<out_t>(s1);
  }
}

// Shared by both entries: reduces the (non-empty) problem into `second` / `first`.
void channel_reduce_into(const ChannelProblem& prob, const at::Tensor& second,
                         const at::Tensor& first, bool accumulate) {
  std::vector<double> partial;
  OBA_DISPATCH_FLOATS(prob.a.scalar_type(), "channel_score_reduce_cpu", [&] {
    const auto p = channel_params<scalar_t>(prob);
    if (prob.b.defined()) {
      partial = prob.channels_last ? reduce_cols<scalar_t, true>(p) : reduce_rows<scalar_t, true>(p);
    } else {
      partial = prob.channels_last ? reduce_cols<scalar_t, false>(p) : reduce_rows<scalar_t, false>(p);
    }
  });
  OBA_DISPATCH_OUT(second.scalar_type(), "channel_score_reduce_cpu_out", [&] {
    ChannelOutParams<scalar_t> out{second.data_ptr<scalar_t>(), first.data_ptr<scalar_t>(),
                                   second.stride(0), first.stride(0), accumulate};
    write_out<scalar_t>(partial, prob.channels, out);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_score_reduce_cpu(const at::Tensor& a,
                                                            const std::optional<at::Tensor>& b,
                                                            const at::Tensor& c, const at::Tensor& d,
                                                            int64_t channel_dim) {
  const char* fn = "channel_score_reduce";
  const int64_t dim = check_channel_inputs(fn, a, b, c, d, channel_dim);
  const auto opts = a.options().dtype(channel_out_dtype(a));
  const int64_t channels = a.size(dim);
  if (a.numel() == 0) return {at::zeros({channels}, opts), at::zeros({channels}, opts)};
  at::Tensor second = at::empty({channels}, opts), first = at::empty({channels}, opts);
  channel_reduce_into(make_channel_problem(a, b, c, d, dim), second, first, /*accumulate=*/false);
  return {second, first};
}

void channel_score_reduce_add__cpu(const at::Tensor& a, const std::optional<at::Tensor>& b,
                                   const at::Tensor& c, const at::Tensor& d, int64_t channel_dim,
                                   at::Tensor& second_acc, at::Tensor& first_acc) {
  const char* fn = "channel_score_reduce_add_";
  const int64_t dim = check_channel_inputs(fn, a, b, c, d, channel_dim);
  check_channel_accumulators(fn, a, dim, second_acc, first_acc);
  if (a.numel() == 0) return;
  channel_reduce_into(make_channel_problem(a, b, c, d, dim), second_acc, first_acc,
                      /*accumulate=*/true);
}

TORCH_LIBRARY_IMPL(oba_ext, CPU, m) {
  m.impl("channel_score_reduce", &channel_score_reduce_cpu);
  m.impl("channel_score_reduce_add_", &channel_score_reduce_add__cpu);
}

}  // namespace oba_ext
