// Every op schema of the extension, in ONE TORCH_LIBRARY block, plus the stub of the Python
// module `oba_ext._C`: importing it loads this shared library, which runs the registrations
// (schemas here, kernels in csrc/cpu/*.cpp and csrc/cuda/*.cu via TORCH_LIBRARY_IMPL).
// No pybind11: the Python API is torch.ops.oba_ext.* (typed wrappers in oba_ext/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Empty module; its only job is to be importable so that the library above gets loaded.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "oba_ext compiled kernels: importing this module registers torch.ops.oba_ext.*",
      -1,    // size
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(oba_ext, m) {
  // ---- channel ops (csrc/*/channel.*) ----
  // Per-channel structured scores (SPEC §5), reducing over every dim but channel_dim:
  //   second[k] = Σ a⊙(b − d) + c⊙d  (b None = 0, c None = 0),  first[k] = Σ a⊙d.
  // Returns (second, first): float64 for float64 inputs, else float32.
  m.def("channel_score_reduce(Tensor a, Tensor? b, Tensor? c, Tensor d, int channel_dim) "
        "-> (Tensor, Tensor)");
  // Same, added into running float32/float64 buffers of length C.
  m.def("channel_score_reduce_add_(Tensor a, Tensor? b, Tensor? c, Tensor d, int channel_dim, "
        "Tensor(a!) second_acc, Tensor(b!) first_acc) -> ()");
  // First-order sum only: first[k] = Σ a⊙d (float64 for float64 inputs, else float32).
  m.def("channel_first_order_reduce(Tensor a, Tensor d, int channel_dim) -> Tensor");
  // Debug ops (CPU only, csrc/cpu/channel_emulate.cpp): the CUDA kernels' device code and
  // block/thread decomposition run on the host for a device with num_sms multiprocessors
  // (splits > 0 forces the row-split count). Same results/contract as the ops above.
  m.def("_emulate_channel_score_reduce_cuda(Tensor a, Tensor? b, Tensor? c, Tensor d, "
        "int channel_dim, int num_sms, int splits) -> (Tensor, Tensor)");
  m.def("_emulate_channel_first_order_reduce_cuda(Tensor a, Tensor d, int channel_dim, "
        "int num_sms, int splits) -> Tensor");

  // ---- weight ops (csrc/*/weight.*) ----
  // w ⊙ Σ_k grads[k]ᵀ inputs[k] as one GEMM over the batch-stacked streams (SPEC §5).
  m.def("linear_weight_score(Tensor w, Tensor[] grads, Tensor[] inputs) -> Tensor");
  // w ⊙ conv wgrad(grad_output = cat(grads), input = cat(inputs)) for Conv1d/Conv2d.
  m.def("conv_weight_score(Tensor w, Tensor[] grads, Tensor[] inputs, int[] stride, "
        "int[] padding, int[] dilation, int groups) -> Tensor");

  // ---- attention ops ----
  // (csrc/cpu/attention.cpp, csrc/cuda/attention.cu; twins in oba_ext/reference/attention.py)
  // q: (B,H,N_q,D), k: (B,H_kv,N_k,D), v: (B,H_kv,N_k,D_v) with H_kv | H (grouped-query);
  // tangents/C_O optional (None = 0);
  // mask bool (True = attend) or additive, broadcastable to (B,H,N_q,N_k); scale None = 1/√D.
  // Forward: (O, Ȯ, lse) with Ȯ = ȦV + AV̇, lse (B,H,N_q) float32 (float64 for float64).
  m.def("attention_two_stream_forward(Tensor q, Tensor k, Tensor v, Tensor? q_dot, "
        "Tensor? k_dot, Tensor? v_dot, Tensor? mask, bool is_causal, float? scale) "
        "-> (Tensor, Tensor, Tensor)");
  // Backward (SPEC §4): (G_Q, G_K, G_V, C_Q, C_K, C_V); exact adds the softmax curvature.
  m.def("attention_second_order_backward(Tensor q, Tensor k, Tensor v, Tensor? q_dot, "
        "Tensor? k_dot, Tensor? v_dot, Tensor G_O, Tensor? C_O, Tensor? mask, bool is_causal, "
        "float? scale, Tensor lse, bool exact) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // CPU only, for tests: the ops above with the row-block budget (score elements per block)
  // given and, with emulate_warp, the fused row pass in the CUDA kernel's 32-lane
  // decomposition (csrc/common/attention_rows.h).
  m.def("_attention_forward_config(Tensor q, Tensor k, Tensor v, Tensor? q_dot, Tensor? k_dot, "
        "Tensor? v_dot, Tensor? mask, bool is_causal, float? scale, int block_elems, "
        "bool emulate_warp) -> (Tensor, Tensor, Tensor)");
  m.def("_attention_backward_config(Tensor q, Tensor k, Tensor v, Tensor? q_dot, "
        "Tensor? k_dot, Tensor? v_dot, Tensor G_O, Tensor? C_O, Tensor? mask, bool is_causal, "
        "float? scale, Tensor lse, bool exact, int block_elems, bool emulate_warp) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
