"""The rest of a decoder layer's CPU ops as C++ kernels of our own (issue 21): the norms, RoPE, SiLU * up, the MoE
router, absorbed MLA's attention over the latent cache, and kv_b's two per-head FP8 products around it (issue 22's
weights as released). Each is one op where the torch code it replaces dispatches five to a hundred, so a decode
step's op count and per-op overhead fall. Each has a plain-torch `*_ref` beside it: the contract it meets.

Same extension and conventions as kernels/cpu_ops.py, whose loader builds them (`cpu_ops.available()`): registered
as torch.ops.specdec.* (csrc/fused.cpp, csrc/mla.cpp) with fake implementations, so torch.compile traces each as one
node; `isa` is "auto" (the best path this CPU runs) or a forced "avx512", "avx2" or "portable" (one it lacks is a
ValueError). Tensors are CPU tensors; outputs are new, contiguous tensors, except where an `out` view is given. Bad
arguments raise a one-line ValueError naming the op and the argument (shape, dtype, device, a bad index).
Float32 math throughout; a bfloat16 input, where taken, is converted exactly and its result rounded once.
Threads (torch.get_num_threads) split rows, heads or (sequence, head) pairs; a decode step's sizes stay on the
calling thread.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attn_meta import AttnMeta
from .cpu_ops import _ops, dequant_ref
from .mla import mla_attention_ref as _mla_ref


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, *, isa: str = "auto") -> torch.Tensor:
    """x [T, D] float32 or bfloat16, last dimension contiguous (any row stride); w [D] float32 or bfloat16 ->
    (x * rsqrt(mean(x^2) + eps)) * w [T, D] in x's dtype: model/layers.py's RMSNorm with its float32 operations in
    its order (the sum of squares summed in another order: within ~1e-7 relative). A bfloat16 x is rounded once,
    at the end, where RMSNorm rounds twice."""
    return _ops().rms_norm(x, w, eps, isa)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, *,
                 isa: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder block's pre-norm residual step: x, residual [T, D] of one dtype (float32 or bfloat16), last
    dimensions contiguous; w and eps as rms_norm -> (rms_norm(s, w, eps), s), s = x + residual [T, D] in x's dtype
    (s is the next residual stream, its norm the next sublayer's input). A bfloat16 s is rounded as torch rounds
    x + residual, and normed from that."""
    return _ops().add_rms_norm(x, residual, w, eps, isa)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None, *,
         isa: str = "auto") -> torch.Tensor:
    """model/layers.py's apply_rope on one tensor: x [T, R] or [T, H, R] float32 or bfloat16 holding interleaved
    pairs (x0, x1), (x2, x3)...; any strides but a contiguous last dimension, so a column slice of a wider row needs
    no copy (q[..., dn:] of q [T, H, dn + R], or a[:, C:] of a [T, C + R] latent row). cos, sin [T, R/2] float32
    with contiguous rows. Returns [x1 * cos - x2 * sin | x2 * cos + x1 * sin] (x1 the even, x2 the odd elements) in
    x's shape and dtype: apply_rope's float32 values bit for bit.

    out: a tensor of x's shape and dtype with a contiguous last dimension and any other strides (the k_pe columns of
    the latent row the cache receives, the q_pe columns of the attention's query; x itself rotates x in place)
    receives the result and is returned; it must not partly overlap x."""
    if out is None:
        return _ops().rope(x, cos, sin, isa)
    _ops().rope_into(x, cos, sin, out, isa)
    return out


def silu_mul(h: torch.Tensor, *, isa: str = "auto") -> torch.Tensor:
    """h [T, 2I] float32 or bfloat16, last dimension contiguous (a fused gate+up projection: gate columns, then up)
    -> F.silu(h[:, :I]) * h[:, I:] [T, I] in h's dtype (float32 within a few ulp: e^x within 2 ulp of torch's)."""
    return _ops().silu_mul(h, isa)


def moe_route(x: torch.Tensor, gate_w: torch.Tensor | None, bias: torch.Tensor, n_group: int, topk_group: int,
              top_k: int, norm_topk_prob: bool, routed_scaling_factor: float, *,
              isa: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """model/moe.py's Gate.forward as one op -> (weights [T, top_k] float32, ids [T, top_k] int64).

    x [T, D] float32 or bfloat16 (last dimension contiguous) with gate_w [E, D] float32, any strides (the CPU
    layout's transposed storage too): the logits are x.float() @ gate_w.T by Gate.forward's own torch matmul, bit
    for bit. Or gate_w None and x the logits [T, E] themselves. bias [E] float32, contiguous (the router's
    e_score_correction_bias). Scores are sigmoid(logits) (within 2 ulp of torch.sigmoid); scores + bias choose:
    with n_group > 1 a group's score is the sum of its top two, the topk_group best groups stay, then the top_k best
    experts of those. Weights are the chosen experts' scores (without the bias), divided by their sum + 1e-20 when
    norm_topk_prob, times routed_scaling_factor.

    ids come in torch.topk's order (biased score, descending), and equal scores break as torch.topk breaks them on
    a CPU (the same selection algorithm, aten's TopKImpl.h): on the same scores, ids equal Gate.forward's, order
    included. E must split into n_group groups of two or more (n_group = 1: no groups), topk_group lie in
    [1, n_group], top_k in [1, the experts of the kept groups]."""
    return _ops().moe_route(x, gate_w, bias, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor, isa)


def mla_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, ctx_lens: torch.Tensor,
                  cu_q: torch.Tensor, tree_mask: torch.Tensor, scale: float, c: int, *,
                  isa: str = "auto") -> torch.Tensor:
    """Absorbed MLA over the latent cache: kernels/torch_backend.py's mqa_attention with every length read from
    tensors, so one call serves a decode batch, a chain or a tree, and a step's shapes are fixed by (T, B, W, N).

    q [T, H, C + R] float32 or bfloat16, [q_lat | rotated q_pe] per head, last dimension contiguous; kv_cache
    [slots, C + R] float32 or bfloat16 with contiguous rows, one latent row [latent | rotated k_pe] per key, shared
    by every head; block_table [B, W] int64: key i of sequence b is at slot block_table[b, i]; ctx_lens [B] int64:
    sequence b's cached keys; cu_q [B + 1] int64: sequence b's queries (and its new keys, already written to the
    cache) are rows cu_q[b]:cu_q[b + 1], cu_q[0] = 0, rising, cu_q[B] <= T; tree_mask [T, N] bool: query t of
    sequence b sees keys 0 .. ctx_lens[b] - 1 and new key ctx_lens[b] + j iff tree_mask[t, j] (j < its new keys).
    AttnMeta's block_table, ctx_lens, cu_q and tree_mask are these.

    Returns [T, H, C] float32: softmax(scale * q . key) @ key[:C] over the keys each query sees, the softmax in
    float32 with the (running) max subtracted. Rows past cu_q[B] (padding) are 0; a query that sees no key is NaN,
    as in the references. Metadata that does not fit (a slot outside kv_cache, cu_q falling, more keys than
    block_table or tree_mask rows hold) is a ValueError naming the entry. Threads split (sequence, head) pairs; one
    thread reads each key row once for all its pairs of a sequence."""
    return _ops().mla_attention(q, kv_cache, block_table, ctx_lens, cu_q, tree_mask, scale, c, isa)


def fp8_absorb_q(q_nope: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int],
                 offset: tuple[int, int], dn: int, dv: int, out: torch.Tensor | None = None, *,
                 isa: str = "auto") -> torch.Tensor:
    """Absorbed MLA's query side with kv_b as released: q_lat[t, h, c] = sum_d q_nope[t, h, d] * W[h (dn + dv) + d,
    c] (x @ W over head h's dn key rows), W dequantized in registers and each block's scale applied once to its
    block's partial sum.

    q_nope [T, H, dn] float32 or bfloat16, last dimension contiguous; w [H (dn + dv), C] float8_e4m3fn, contiguous:
    kv_b_proj's weight for this rank's H heads (per head dn key rows, then dv value rows); s, block and offset as
    kernels/cpu_ops.py's fp8_linear takes them (offset: where a tensor-parallel shard starts inside its first
    block). Returns q_lat [T, H, C] in q_nope's dtype. out: a [T, H, C] tensor of q_nope's dtype with a contiguous
    last dimension (q[..., :C] of the attention's query [T, H, C + R]) receives it instead, and is returned.
    Threads split heads."""
    if out is None:
        return _ops().fp8_absorb_q(q_nope, w, s, dn, dv, *block, *offset, isa)
    _ops().fp8_absorb_q_into(q_nope, w, s, dn, dv, *block, *offset, out, isa)
    return out


def fp8_absorb_o(o_lat: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int],
                 offset: tuple[int, int], dn: int, dv: int, *, isa: str = "auto") -> torch.Tensor:
    """Absorbed MLA's output side with kv_b as released: o[t, h, v] = sum_c o_lat[t, h, c] * W[h (dn + dv) + dn + v,
    c] (x @ W.T over head h's dv value rows: fp8_linear's register kernels, per head).

    o_lat [T, H, C] float32 or bfloat16, last dimension contiguous (mla_attention's output); w, s, block, offset as
    fp8_absorb_q. Returns o [T, H, dv] in o_lat's dtype (o.view(T, H * dv) is o_proj's input). Threads split
    heads."""
    return _ops().fp8_absorb_o(o_lat, w, s, dn, dv, *block, *offset, isa)


# ---------------------------------------------------------------------------------------------------------------
# The references: plain torch, the contracts above.


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm in plain torch: RMSNorm's float32 operations, one rounding to x's dtype."""
    xf = x.float()
    r = torch.rsqrt((xf * xf).sum(-1, keepdim=True) * (1.0 / x.shape[-1]) + eps)
    return (xf * r * w.float()).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm in plain torch."""
    s = x + residual
    return rms_norm_ref(s, w, eps), s


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope in plain torch: apply_rope's body."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def silu_mul_ref(h: torch.Tensor) -> torch.Tensor:
    """silu_mul in plain torch."""
    a, b = h.float().chunk(2, dim=-1)
    return (F.silu(a) * b).to(h.dtype)


def moe_route_ref(x: torch.Tensor, gate_w: torch.Tensor | None, bias: torch.Tensor, n_group: int, topk_group: int,
                  top_k: int, norm_topk_prob: bool,
                  routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_route in plain torch: Gate.forward's body (logits given when gate_w is None)."""
    scores = (x.float() if gate_w is None else x.float() @ gate_w.t()).sigmoid()
    choice = scores + bias
    if n_group > 1:
        t = x.shape[0]
        grouped = choice.view(t, n_group, -1)
        keep = torch.zeros(t, n_group, dtype=torch.bool)
        keep.scatter_(1, grouped.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, -1)
    ids = choice.topk(top_k, dim=-1).indices
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor, ids


def mla_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, ctx_lens: torch.Tensor,
                      cu_q: torch.Tensor, tree_mask: torch.Tensor, scale: float, c: int) -> torch.Tensor:
    """kernels/mla.py's mla_attention_ref on the same tensors, padding rows 0."""
    cu = tuple(cu_q.tolist())
    meta = AttnMeta(block_table=block_table, ctx_lens=ctx_lens, cu_q=cu_q, tree_mask=tree_mask,
                    slots=torch.empty(0, dtype=torch.long), host_ctx_lens=tuple(ctx_lens.tolist()), host_cu_q=cu)
    out = _mla_ref(q[..., :c], q[..., c:], kv_cache, meta, scale)
    out[cu[-1]:] = 0
    return out


def _absorb_ref_weight(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int], offset: tuple[int, int],
                       dn: int, dv: int) -> torch.Tensor:
    return dequant_ref(w, s, block, offset).view(-1, dn + dv, w.shape[1])  # [H, dn + dv, C]


def fp8_absorb_q_ref(q_nope: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int],
                     offset: tuple[int, int], dn: int, dv: int) -> torch.Tensor:
    """fp8_absorb_q in plain torch: dequantize, then an einsum."""
    wd = _absorb_ref_weight(w, s, block, offset, dn, dv)
    return torch.einsum("thd,hdc->thc", q_nope.float(), wd[:, :dn]).to(q_nope.dtype)


def fp8_absorb_o_ref(o_lat: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int],
                     offset: tuple[int, int], dn: int, dv: int) -> torch.Tensor:
    """fp8_absorb_o in plain torch: dequantize, then an einsum."""
    wd = _absorb_ref_weight(w, s, block, offset, dn, dv)
    return torch.einsum("thc,hvc->thv", o_lat.float(), wd[:, dn:]).to(o_lat.dtype)


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing (cpu_ops' loader calls this once the ops are loaded)."""
    fake = torch.library.register_fake

    @fake("specdec::rms_norm")
    def _(x, w, eps, isa="auto"):
        return x.new_empty(x.shape)

    @fake("specdec::add_rms_norm")
    def _(x, residual, w, eps, isa="auto"):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @fake("specdec::rope")
    def _(x, cos, sin, isa="auto"):
        return x.new_empty(x.shape)

    @fake("specdec::rope_into")
    def _(x, cos, sin, out, isa="auto"):
        return None

    @fake("specdec::silu_mul")
    def _(h, isa="auto"):
        return h.new_empty(h.shape[0], h.shape[1] // 2)

    @fake("specdec::moe_route")
    def _(x, gate_w, bias, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor, isa="auto"):
        return x.new_empty(x.shape[0], top_k, dtype=torch.float32), x.new_empty(x.shape[0], top_k, dtype=torch.long)

    @fake("specdec::mla_attention")
    def _(q, kv_cache, block_table, ctx_lens, cu_q, tree_mask, scale, c, isa="auto"):
        return q.new_empty(q.shape[0], q.shape[1], c, dtype=torch.float32)

    @fake("specdec::fp8_absorb_q")
    def _(q_nope, w, s, dn, dv, block_n=128, block_k=128, n_off=0, k_off=0, isa="auto"):
        return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w.shape[1])

    @fake("specdec::fp8_absorb_q_into")
    def _(q_nope, w, s, dn, dv, block_n, block_k, n_off, k_off, out, isa="auto"):
        return None

    @fake("specdec::fp8_absorb_o")
    def _(o_lat, w, s, dn, dv, block_n=128, block_k=128, n_off=0, k_off=0, isa="auto"):
        return o_lat.new_empty(o_lat.shape[0], o_lat.shape[1], dv)
