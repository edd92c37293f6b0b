// CPU kernels of the attention ops (SPEC §4). The host routine is the one the CUDA kernels
// use (csrc/common/attention_blocks.h: row blocks over the (batch, key/value head) groups and
// the query rows, products as ATen GEMMs); only the fused elementwise row pass runs here, as
// a loop over the block's rows, each row in one "lane" (attention_rows.h, nl = 1).
// float32 / float64. Extra memory O(block), whatever N is (at N = 4096 a few MB).
//
// Two private ops run the same routine with a chosen block budget and, optionally, the row
// pass in the GPU's decomposition (32 lanes combined by an emulated xor butterfly): the CPU
// tests use them to execute the CUDA kernel's arithmetic and block boundaries without a GPU.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../common/attention_blocks.h"

namespace oba_ext {
namespace {

using attention::present;
using attention::Shapes;

// The row pass on the CPU: rows in parallel (ATen's intra-op threads), each row's lanes
// (1, or the emulated warp's 32) one after the other.
template <typename Lanes>
struct CpuRows {
  template <typename T>
  using acc = at::opmath_type<T>;

  template <typename F>
  static void dispatch(at::ScalarType t, F&& f) {
    AT_DISPATCH_FLOATING_TYPES(t, "attention_cpu", [&] { f(attention::TypeTag<scalar_t>{}); });
  }

  template <typename P, typename RowFn>
  static void each_row(const P& p, int64_t nrows, RowFn row) {
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, p.geom.Nk));
    at::parallel_for(0, nrows, grain, [&](int64_t b, int64_t e) {
      const Lanes L{};
      for (int64_t rho = b; rho < e; ++rho) row(L, p, rho);
    });
  }

  template <typename scalar_t, typename acc_t>
  void forward(const attention::rows::RowParams<scalar_t, acc_t>& p, int64_t nrows) {
    each_row(p, nrows, [](const Lanes& L, const auto& q, int64_t rho) {
      attention::rows::forward_row(L, q, rho);
    });
  }

  template <typename scalar_t, typename acc_t>
  void backward(const attention::rows::RowParams<scalar_t, acc_t>& p, int64_t nrows) {
    each_row(p, nrows, [](const Lanes& L, const auto& q, int64_t rho) {
      attention::rows::backward_row(L, q, rho);
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

template <typename Lanes>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const c10::optional<at::Tensor>& mask,
    bool is_causal, c10::optional<double> scale, int64_t block_elems) {
  const Shapes s = check_cpu(op, q, k, v, q_dot, k_dot, v_dot, block_elems);
  CpuRows<Lanes> rows;
  return attention::run_forward(rows, op, s, q, k, v, q_dot, k_dot, v_dot, mask, is_causal,
                                scale, block_elems);
}

template <typename Lanes>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_impl(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
              const c10::optional<at::Tensor>& v_dot, const at::Tensor& G_O,
              const c10::optional<at::Tensor>& C_O, const c10::optional<at::Tensor>& mask,
              bool is_causal, c10::optional<double> scale, const at::Tensor& lse, bool exact,
              int64_t block_elems) {
  const Shapes s = check_cpu(op, q, k, v, q_dot, k_dot, v_dot, block_elems);
  CpuRows<Lanes> rows;
  return attention::run_backward(rows, op, s, q, k, v, q_dot, k_dot, v_dot, G_O, C_O, mask,
                                 is_causal, scale, lse, exact, block_elems);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_two_stream_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_dot, const c10::optional<at::Tensor>& k_dot,
    const c10::optional<at::Tensor>& v_dot, const c10::optional<at::Tensor>& mask,
    bool is_causal, c10::optional<double> scale) {
  return forward_impl<attention::rows::SerialLane>("attention_two_stream_forward", q, k, v,
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
  return backward_impl<attention::rows::SerialLane>(
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
    return forward_impl<attention::rows::EmulatedWarp>(op, q, k, v, q_dot, k_dot, v_dot, mask,
                                                       is_causal, scale, block_elems);
  }
  return forward_impl<attention::rows::SerialLane>(op, q, k, v, q_dot, k_dot, v_dot, mask,
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
    return backward_impl<attention::rows::EmulatedWarp>(op, q, k, v, q_dot, k_dot, v_dot, G_O,
                                                        C_O, mask, is_causal, scale, lse, exact,
                                                        block_elems);
  }
  return backward_impl<attention::rows::SerialLane>(op, q, k, v, q_dot, k_dot, v_dot, G_O, C_O,
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
