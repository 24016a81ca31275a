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
}

TORCH_LIBRARY_IMPL(specdec, CPU, m) {
  m.impl("fp8_linear", &specdec::fp8_linear);
  m.impl("bf16_linear", &specdec::bf16_linear);
  m.impl("fp8_moe", &specdec::fp8_moe);
}
