// The ops' schemas, registered once (torch.ops.specdec.*); their CPU kernels live one file per op family.
#include <torch/library.h>

#include "cpu_ops.h"

TORCH_LIBRARY(specdec, m) {
  m.def("cpu_isas() -> str[]", [] { return specdec::cpu_isas(); });
  m.def("fp8_linear(Tensor x, Tensor w, Tensor s, int block_n=128, int block_k=128, int n_off=0, int k_off=0, "
        "str isa=\"auto\", int? gemm_rows=None) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor w, str isa=\"auto\", int? gemm_rows=None) -> Tensor");
  m.def("fp8_moe(Tensor x, Tensor topk_ids, Tensor topk_w, Tensor w13, Tensor w2, Tensor s13, Tensor s2, "
        "int block_n=128, int block_k=128, str isa=\"auto\", int? gemm_rows=None) -> Tensor");
  // fused.cpp
  m.def("rms_norm(Tensor x, Tensor w, float eps, str isa=\"auto\") -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor w, float eps, str isa=\"auto\") -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, str isa=\"auto\") -> Tensor");
  m.def("rope_into(Tensor x, Tensor cos, Tensor sin, Tensor(a!) out, str isa=\"auto\") -> ()");
  m.def("silu_mul(Tensor h, str isa=\"auto\") -> Tensor");
  m.def("moe_route(Tensor x, Tensor? gate_w, Tensor bias, int n_group, int topk_group, int top_k, "
        "bool norm_topk_prob, float routed_scaling_factor, str isa=\"auto\") -> (Tensor, Tensor)");
  // mla.cpp
  m.def("mla_attention(Tensor q, Tensor kv_cache, Tensor block_table, Tensor ctx_lens, Tensor cu_q, "
        "Tensor tree_mask, float scale, int c, str isa=\"auto\") -> Tensor");
  m.def("fp8_absorb_q(Tensor q_nope, Tensor w, Tensor s, int dn, int dv, int block_n=128, int block_k=128, "
        "int n_off=0, int k_off=0, str isa=\"auto\") -> Tensor");
  m.def("fp8_absorb_q_into(Tensor q_nope, Tensor w, Tensor s, int dn, int dv, int block_n, int block_k, int n_off, "
        "int k_off, Tensor(a!) out, str isa=\"auto\") -> ()");
  m.def("fp8_absorb_o(Tensor o_lat, Tensor w, Tensor s, int dn, int dv, int block_n=128, int block_k=128, "
        "int n_off=0, int k_off=0, str isa=\"auto\") -> Tensor");
}

TORCH_LIBRARY_IMPL(specdec, CPU, m) {
  m.impl("fp8_linear", &specdec::fp8_linear);
  m.impl("bf16_linear", &specdec::bf16_linear);
  m.impl("fp8_moe", &specdec::fp8_moe);
}

// The fused ops take every backend's tensors, so a GPU tensor meets their one-line device check, not the dispatcher's
// missing-kernel message.
TORCH_LIBRARY_IMPL(specdec, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", &specdec::rms_norm);
  m.impl("add_rms_norm", &specdec::add_rms_norm);
  m.impl("rope", &specdec::rope);
  m.impl("rope_into", &specdec::rope_into);
  m.impl("silu_mul", &specdec::silu_mul);
  m.impl("moe_route", &specdec::moe_route);
  m.impl("mla_attention", &specdec::mla_attention);
  m.impl("fp8_absorb_q", &specdec::fp8_absorb_q);
  m.impl("fp8_absorb_q_into", &specdec::fp8_absorb_q_into);
  m.impl("fp8_absorb_o", &specdec::fp8_absorb_o);
}
