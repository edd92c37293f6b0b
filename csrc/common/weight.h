// linear_weight_score and conv_weight_score (SPEC §5), the whole host code shared by the CPU and
// CUDA entries (csrc/cpu/weight.cpp, csrc/cuda/weight.cu only register it, the CUDA one under a
// device guard): checks, the batch-stacked weight-gradient product through ATen's GEMM /
// convolution wgrad (BLAS/cuBLAS/cuDNN), then score = w ⊙ P as one elementwise pass in place on
// P. That pass is not fused into the GEMM/wgrad (cuBLAS/cuDNN expose no such epilogue); it reads
// w once and rewrites P once.
//
// Precision. The product is computed in the score dtype: float64 for float64 weights, float32
// for float32/float16/bfloat16. float16/bfloat16 streams are converted to float32 before the
// product (exactly), so every product and the accumulation over rows and over streams are in
// float32 — not a float16 GEMM output rounded per stream. TF32: on Ampere/Hopper GPUs, float32
// (and upcast float16/bfloat16) products follow PyTorch's switches:
// torch.backends.cuda.matmul.allow_tf32 for linear_weight_score (default False: full float32) and
// torch.backends.cudnn.allow_tf32 for conv_weight_score (default True: inputs rounded to TF32's
// 10-bit mantissa, ~1e-3 relative error per product for float32 inputs; float16 values fit TF32
// exactly, bfloat16 too). Set the switch to False for float32-exact convolution products.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <vector>

#include "checks.h"

namespace oba_ext {

// float64 weights give float64 scores; float32/float16/bfloat16 give float32.
inline at::ScalarType weight_out_dtype(const at::Tensor& w) {
  return w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_stream_lists(const char* fn, const at::Tensor& w, at::TensorList grads,
                               at::TensorList inputs) {
  check_defined(w, fn, "w");
  check_float(w, fn, "w");
  TORCH_CHECK(!grads.empty(), fn, ": argument 'grads' must hold at least one tensor");
  TORCH_CHECK(grads.size() == inputs.size(), fn, ": arguments 'grads' and 'inputs' must have the ",
              "same length (one pair per stream), got ", grads.size(), " and ", inputs.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    check_defined(grads[i], fn, list_item("grads", i).c_str());
    check_defined(inputs[i], fn, list_item("inputs", i).c_str());
    check_same_dtype_device(grads[i], list_item("grads", i), w, "w", fn);
    check_same_dtype_device(inputs[i], list_item("inputs", i), w, "w", fn);
  }
}

// The tensors concatenated along dim 0 in `dtype`, in one copy (one conversion for 16-bit
// streams); a single stream already in `dtype` is returned as is.
inline at::Tensor stack_rows_as(const std::vector<at::Tensor>& ts, at::ScalarType dtype) {
  if (ts.size() == 1 && ts[0].scalar_type() == dtype) return ts[0];
  std::vector<int64_t> sizes = ts[0].sizes().vec();
  int64_t rows = 0;
  for (const auto& t : ts) rows += t.size(0);
  sizes[0] = rows;
  at::Tensor out = at::empty(sizes, ts[0].options().dtype(dtype));
  int64_t at_row = 0;
  for (const auto& t : ts) {
    out.narrow(0, at_row, t.size(0)).copy_(t);
    at_row += t.size(0);
  }
  return out;
}

// P = Σ_k grads[k]ᵀ · inputs[k] (as [M_k, C_out]ᵀ · [M_k, C_in]): [C_out, C_in] in
// weight_out_dtype(w) — the GEMM over the batch-stacked streams, accumulated stream by stream
// (mm, then addmm_ with beta = 1) instead of on cat()-ed copies: same FLOPs, no copy of the
// streams (16-bit streams: one float32 copy of one stream at a time). Measured on the 2-core CPU
// at M = 4096, C = 1024: cat + mm 116 ms (cat alone 24 ms), mm + addmm_ 90 ms, and 4× less peak
// memory. Returns an undefined tensor when there are no rows (P = 0).
inline at::Tensor linear_weight_product(const char* fn, const at::Tensor& w, at::TensorList grads,
                                        at::TensorList inputs) {
  check_stream_lists(fn, w, grads, inputs);
  TORCH_CHECK(w.dim() == 2, fn, ": argument 'w' must be a 2-D [C_out, C_in] Linear weight, got shape ",
              w.sizes());
  const int64_t c_out = w.size(0), c_in = w.size(1);
  std::vector<at::Tensor> gs, xs;
  int64_t rows = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& x = inputs[i];
    TORCH_CHECK(g.dim() >= 1 && g.size(-1) == c_out, fn, ": argument '", list_item("grads", i),
                "' must have shape [..., C_out] with C_out = ", c_out, " (w.size(0)), got ", g.sizes());
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == c_in, fn, ": argument '", list_item("inputs", i),
                "' must have shape [..., C_in] with C_in = ", c_in, " (w.size(1)), got ", x.sizes());
    TORCH_CHECK(g.sizes().slice(0, g.dim() - 1) == x.sizes().slice(0, x.dim() - 1), fn,
                ": arguments '", list_item("grads", i), "' ", g.sizes(), " and '",
                list_item("inputs", i), "' ", x.sizes(), " must share their leading dims");
    gs.push_back(g.reshape({-1, c_out}));
    xs.push_back(x.reshape({-1, c_in}));
    rows += gs.back().size(0);
  }
  if (rows == 0 || c_out == 0 || c_in == 0) return at::Tensor();
  const at::ScalarType dtype = weight_out_dtype(w);
  at::Tensor P;
  for (size_t i = 0; i < gs.size(); ++i) {
    if (gs[i].size(0) == 0) continue;
    const at::Tensor g = gs[i].to(dtype), x = xs[i].to(dtype);  // no copy unless 16-bit
    if (!P.defined()) {
      P = at::mm(g.t(), x);
    } else {
      P.addmm_(g.t(), x);
    }
  }
  return P;
}

// Expands a per-dim conv parameter given with 1 or `nsp` entries.
inline std::vector<int64_t> conv_param(const char* fn, const char* name, at::IntArrayRef v,
                                       int64_t nsp, int64_t min_value) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == nsp || v.size() == 1, fn, ": argument '", name,
              "' must have 1 or ", nsp, " entries for a ", nsp, "-d convolution, got ", v);
  std::vector<int64_t> out(nsp, v[0]);
  if (static_cast<int64_t>(v.size()) == nsp) out.assign(v.begin(), v.end());
  for (int64_t x : out) {
    TORCH_CHECK(x >= min_value, fn, ": argument '", name, "' entries must be >= ", min_value,
                ", got ", v);
  }
  return out;
}

// P = wgrad of conv(input = cat_k inputs[k], weight = w) at grad_output = cat_k grads[k] (stacked
// along the batch): the shape of w, in weight_out_dtype(w) (16-bit streams and w are converted
// to float32 first). Undefined when the batch is empty (P = 0).
inline at::Tensor conv_weight_product(const char* fn, const at::Tensor& w, at::TensorList grads,
                                      at::TensorList inputs, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups) {
  check_stream_lists(fn, w, grads, inputs);
  TORCH_CHECK(w.dim() == 3 || w.dim() == 4, fn, ": argument 'w' must be a Conv1d/Conv2d weight ",
              "[C_out, C_in/groups, k...] with 3 or 4 dims, got shape ", w.sizes());
  const int64_t nsp = w.dim() - 2;
  const auto st = conv_param(fn, "stride", stride, nsp, 1);
  const auto pad = conv_param(fn, "padding", padding, nsp, 0);
  const auto dil = conv_param(fn, "dilation", dilation, nsp, 1);
  TORCH_CHECK(groups >= 1, fn, ": argument 'groups' must be >= 1, got ", groups);
  const int64_t c_out = w.size(0), c_in = w.size(1) * groups;
  TORCH_CHECK(c_out % groups == 0, fn, ": argument 'w' has C_out = ", c_out,
              " which is not divisible by groups = ", groups);
  std::vector<at::Tensor> gs, xs;
  int64_t batch = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& x = inputs[i];
    TORCH_CHECK(x.dim() == w.dim() && x.size(1) == c_in, fn, ": argument '", list_item("inputs", i),
                "' must have shape [N, C_in = ", c_in, ", spatial x", nsp, "], got ", x.sizes());
    TORCH_CHECK(g.dim() == w.dim() && g.size(1) == c_out && g.size(0) == x.size(0), fn,
                ": argument '", list_item("grads", i), "' must have shape [N = ", x.size(0),
                ", C_out = ", c_out, ", spatial x", nsp, "], got ", g.sizes());
    for (int64_t s = 0; s < nsp; ++s) {
      const int64_t expect =
          (x.size(2 + s) + 2 * pad[s] - dil[s] * (w.size(2 + s) - 1) - 1) / st[s] + 1;
      TORCH_CHECK(g.size(2 + s) == expect, fn, ": argument '", list_item("grads", i),
                  "' has spatial size ", g.sizes().slice(2), " but the convolution of '",
                  list_item("inputs", i), "' ", x.sizes(), " with w ", w.sizes(),
                  " (stride ", st, ", padding ", pad, ", dilation ", dil, ") gives ", expect,
                  " in spatial dim ", s);
    }
    batch += x.size(0);
    gs.push_back(g);
    xs.push_back(x);
  }
  if (batch == 0 || w.numel() == 0) return at::Tensor();
  const at::ScalarType dtype = weight_out_dtype(w);
  const at::Tensor G = stack_rows_as(gs, dtype);
  const at::Tensor X = stack_rows_as(xs, dtype);
  const std::vector<int64_t> out_pad(nsp, 0);
  auto res = at::convolution_backward(G, X, w.to(dtype), std::nullopt, st, pad, dil,
                                      /*transposed=*/false, out_pad, groups, {false, true, false});
  return std::get<1>(res);
}

// score = w ⊙ P in weight_out_dtype(w), contiguous, computed in place on P (P is a fresh
// product in that dtype; float16/bfloat16 w is converted exactly). P undefined means P = 0.
inline at::Tensor weight_score_from_product(const at::Tensor& w, at::Tensor P) {
  const auto opts = w.options().dtype(weight_out_dtype(w));
  if (!P.defined() || w.numel() == 0) return at::zeros(w.sizes(), opts);
  TORCH_INTERNAL_ASSERT(P.scalar_type() == opts.dtype().toScalarType() && P.sizes() == w.sizes());
  if (!P.is_contiguous()) P = P.contiguous();
  return P.mul_(w);
}

// The op bodies (the CPU and CUDA registrations call these).
inline at::Tensor linear_weight_score_impl(const at::Tensor& w, at::TensorList grads,
                                           at::TensorList inputs) {
  return weight_score_from_product(w, linear_weight_product("linear_weight_score", w, grads, inputs));
}

inline at::Tensor conv_weight_score_impl(const at::Tensor& w, at::TensorList grads,
                                         at::TensorList inputs, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups) {
  return weight_score_from_product(
      w, conv_weight_product("conv_weight_score", w, grads, inputs, stride, padding, dilation, groups));
}

}  // namespace oba_ext
