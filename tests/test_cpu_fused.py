"""The fused C++ CPU ops (kernels/cpu_fused.py) against their plain-torch references and the model code each
replaces (RMSNorm, apply_rope, F.silu * up, Gate.forward, mqa_attention, the absorbed einsums): every code path
forced in turn, random shapes, strided views, 1 and 2 threads, bad inputs, torch.compile."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest
import test_cpu_ops
import torch
import torch.nn.functional as F
from test_kernels_mla import _tree_mask as tree_mask

from specdec.kernels import cpu_fused as fused
from specdec.kernels import cpu_ops
from specdec.kernels.attn_meta import AttnMeta, causal_tree_mask
from specdec.kernels.torch_backend import mqa_attention
from specdec.model.config import ModelConfig
from specdec.model.layers import RMSNorm, apply_rope
from specdec.model.moe import Gate

# test_cpu_ops' fixtures serve here too: the build (autouse), each code path, two threads; and its helpers
built, isa, two_threads = test_cpu_ops.built, test_cpu_ops.isa, test_cpu_ops.two_threads
rel, quantized = test_cpu_ops.rel, test_cpu_ops.quantized
TOL = 2e-6  # relative error; these paths measure 1e-7..4e-7 typically, 1.0e-6 at worst over 9,000 random cases
BF16_TOL = 8e-3  # a bfloat16 rounding


def rand_dim(g: torch.Generator, hi: int) -> int:
    return int(torch.randint(1, hi, (1,), generator=g))


def wide(g: torch.Generator, *shape: int, extra: int = 5) -> torch.Tensor:
    """Random [..., n] as the last columns of a wider tensor: rows not contiguous, the last dimension is."""
    return torch.randn(*shape[:-1], extra + shape[-1], generator=g)[..., extra:]


@pytest.mark.parametrize("t", [1, 2, 5, 17])
def test_rms_norm_matches_the_model(seed: int, isa: str, t: int) -> None:
    g = torch.Generator().manual_seed(seed)
    d = rand_dim(g, 600)
    eps = float(torch.rand(1, generator=g)) * 1e-3
    norm = RMSNorm(d, eps, torch.float32)
    norm.weight.copy_(torch.randn(d, generator=g))
    x, res = wide(g, t, d), wide(g, t, d)
    y = fused.rms_norm(x, norm.weight, eps, isa=isa)
    assert y.shape == (t, d) and y.dtype == torch.float32
    assert rel(y, norm(x)) < TOL and rel(y, fused.rms_norm_ref(x, norm.weight, eps)) < TOL, f"seed {seed}: d={d}"
    normed, s = fused.add_rms_norm(x, res, norm.weight, eps, isa=isa)
    assert torch.equal(s, x + res)
    assert rel(normed, norm(x + res)) < TOL, f"seed {seed}: d={d}"


def test_norms_bfloat16(seed: int, isa: str) -> None:
    g = torch.Generator().manual_seed(seed)
    x, res, w = torch.randn(3, 200, generator=g).bfloat16(), torch.randn(3, 200, generator=g).bfloat16(), \
        torch.randn(200, generator=g).bfloat16()
    norm = RMSNorm(200, 1e-6, torch.bfloat16)
    norm.weight.copy_(w)
    y = fused.rms_norm(x, w, 1e-6, isa=isa)
    assert y.dtype == torch.bfloat16 and rel(y, norm(x)) < BF16_TOL  # RMSNorm rounds twice, the op once
    normed, s = fused.add_rms_norm(x, res, w, 1e-6, isa=isa)
    assert torch.equal(s, x + res) and rel(normed, norm(x + res)) < BF16_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_apply_rope_bit_for_bit(seed: int, isa: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    t, h, dn, c = rand_dim(g, 9), rand_dim(g, 6), rand_dim(g, 40), rand_dim(g, 70)
    r = 2 * rand_dim(g, 70)
    cos, sin = torch.randn(t, r // 2, generator=g), torch.randn(t, r // 2, generator=g)
    q = torch.randn(t, h, dn + r, generator=g).to(dtype)  # the q_pe columns of q: a strided view
    expect = apply_rope(q[..., dn:], (cos, sin))
    y = fused.rope(q[..., dn:], cos, sin, isa=isa)
    assert y.dtype == dtype and torch.equal(y, expect), f"seed {seed}: t={t} h={h} r={r}"
    row = torch.zeros(t, c + r, dtype=dtype)  # k_pe rotated straight into the latent row the cache receives
    k_pe = torch.randn(t, c + r + 3, generator=g).to(dtype)[:, c + 3:]
    assert fused.rope(k_pe, cos, sin, out=row[:, c:], isa=isa).data_ptr() == row[:, c:].data_ptr()
    assert torch.equal(row[:, c:], apply_rope(k_pe[:, None], (cos, sin))[:, 0]) and not row[:, :c].any()
    q_pe = q[..., dn:].clone()
    fused.rope(q[..., dn:], cos, sin, out=q[..., dn:], isa=isa)  # in place
    assert torch.equal(q[..., dn:], expect) and torch.equal(fused.rope_ref(q_pe, cos, sin), expect)


def test_silu_mul(seed: int, isa: str) -> None:
    g = torch.Generator().manual_seed(seed)
    t, i = rand_dim(g, 9), 2 + rand_dim(g, 300)  # I >= 3: the first row's gate half holds the three cases below
    h = wide(g, t, 2 * i) * 4
    h[0, :3] = torch.tensor([-200.0, 90.0, 0.0])  # e^-x under- and overflowing, and 0
    y = fused.silu_mul(h, isa=isa)
    expect = F.silu(h[:, :i]) * h[:, i:]
    assert y.shape == (t, i) and rel(y, expect) < TOL, f"seed {seed}: I={i}"
    assert ((y - expect).abs() <= TOL * expect.abs() + 1e-30).all(), f"seed {seed}: I={i}"  # elementwise too
    assert rel(fused.silu_mul(h.bfloat16(), isa=isa), fused.silu_mul_ref(h.bfloat16())) < BF16_TOL


ROUTERS = {  # E, n_group, topk_group, top_k, norm_topk_prob
    "bundled": (16, 4, 2, 2, True), "V3": (256, 8, 4, 8, True), "ungrouped": (64, 1, 1, 6, False),
    "partial sort": (128, 1, 1, 2, True),  # torch.topk's other algorithm: k * 64 <= n
}


def gate(e: int, d: int, n_group: int, topk_group: int, top_k: int, norm: bool, scale: float) -> Gate:
    cfg = types.SimpleNamespace(n_routed_experts=e, hidden_size=d, n_group=n_group, topk_group=topk_group,
                                num_experts_per_tok=top_k, norm_topk_prob=norm, routed_scaling_factor=scale)
    return Gate(cfg)


@pytest.mark.parametrize("router", ROUTERS)
def test_moe_route_is_gate_forward(seed: int, isa: str, router: str) -> None:
    g = torch.Generator().manual_seed(seed)
    e, n_group, topk_group, top_k, norm = ROUTERS[router]
    t, d = rand_dim(g, 17), rand_dim(g, 300)
    gt = gate(e, d, n_group, topk_group, top_k, norm, 2.5)
    gt.weight.copy_(torch.randn(e, d, generator=g) * 0.1)
    gt.e_score_correction_bias.copy_(torch.randn(e, generator=g) * 0.05)
    x = torch.randn(t, d, generator=g)
    args = (gt.e_score_correction_bias, n_group, topk_group, top_k, norm, 2.5)
    w_ref, ids_ref = gt(x)
    for gate_w in (gt.weight, gt.weight.t().contiguous().t()):  # the CPU layout stores it transposed
        w, ids = fused.moe_route(x, gate_w, *args, isa=isa)
        assert torch.equal(ids, ids_ref), f"seed {seed}"  # order included: torch.topk's
        assert w.dtype == torch.float32 and rel(w, w_ref) < TOL, f"seed {seed}"
    logits = x @ gt.weight.t()
    w, ids = fused.moe_route(logits, None, *args, isa=isa)
    assert torch.equal(ids, ids_ref) and rel(w, w_ref) < TOL, f"seed {seed}"
    assert all(torch.equal(a, b) for a, b in zip(fused.moe_route_ref(logits, None, *args), gt(x)))


@pytest.mark.parametrize("router", ROUTERS)
def test_moe_route_breaks_ties_as_torch(seed: int, isa: str, router: str) -> None:
    # logits and biases from a few levels: equal experts within and across groups, equal group scores
    g = torch.Generator().manual_seed(seed)
    e, n_group, topk_group, top_k, norm = ROUTERS[router]
    levels = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    logits = levels[torch.randint(4, (64, e), generator=g)]
    bias = torch.randint(2, (e,), generator=g) * 0.25
    args = (bias, n_group, topk_group, top_k, norm, 1.5)
    w, ids = fused.moe_route(logits, None, *args, isa=isa)
    w_ref, ids_ref = fused.moe_route_ref(logits, None, *args)
    assert torch.equal(ids, ids_ref) and rel(w, w_ref) < TOL, f"seed {seed}"


def attn_case(g: torch.Generator, ctx: list[int], n_new: list[int], tree: bool, h: int, c: int, r: int,
              kv_dtype: torch.dtype = torch.float32, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, AttnMeta]:
    """q [T + pad, H, C + R], a cache whose sequences' slots are scattered over it, and their metadata."""
    pool = torch.randperm(sum(ctx) + sum(n_new) + 11, generator=g)  # 11 slots nobody owns
    bt = torch.full((len(ctx), max(a + b for a, b in zip(ctx, n_new)) + 3), -1, dtype=torch.long)
    o = 0
    for b, (a, n) in enumerate(zip(ctx, n_new)):
        bt[b, :a + n] = pool[o:o + a + n]
        o += a + n
    n_max = max(n_new)
    tm = torch.cat([F.pad(tree_mask(g, n), (0, n_max - n)) for n in n_new]) if tree else causal_tree_mask(n_new)
    q = torch.randn(sum(n_new) + pad, h, c + r, generator=g)
    kv = torch.randn(len(pool), c + r, generator=g).to(kv_dtype)
    return q, kv, AttnMeta.build(bt, ctx, n_new, F.pad(tm, (0, 0, 0, pad)))


ATTN = {  # ctx_lens, new tokens per sequence, tree masks
    "decode batch": ([1, 37, 90, 0], [1, 1, 1, 1], False),
    "chains": ([12, 0, 150], [3, 1, 4], False),
    "trees": ([20, 65, 0, 9], [5, 8, 0, 2], True),  # one sequence with no new tokens this step
    "one long tree": ([300], [33], True),
}


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ATTN)
def test_mla_attention_matches_both_references(seed: int, isa: str, case: str, kv_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    ctx, n_new, tree = ATTN[case]
    h, c, r = rand_dim(g, 6), rand_dim(g, 150), rand_dim(g, 40)
    q, kv, meta = attn_case(g, ctx, n_new, tree, h, c, r, kv_dtype)
    scale = 0.05 + float(torch.rand(1, generator=g)) * 0.1
    tensors = (meta.block_table, meta.ctx_lens, meta.cu_q, meta.tree_mask)
    out = fused.mla_attention(q, kv, *tensors, scale, c, isa=isa)
    assert out.shape == (len(q), h, c) and out.dtype == torch.float32
    # as accurate as the float32 reference: within 2e-6 of a float64 evaluation, or no more than twice as far as
    # the reference (the measure divides by max |out|, which shrinks as a context grows: at 300 keys the reference
    # itself is up to 2e-6 off; the scalar path sums each dot product in one chain)
    ref = fused.mla_attention_ref(q, kv, *tensors, scale, c)
    f64 = attention_f64(q, kv, meta, scale, c)
    err, ref_err = rel(out, f64), rel(ref, f64)
    assert err < max(2 * TOL, 2 * ref_err), f"seed {seed}: H={h} C={c} R={r}: {err:.2e} (reference: {ref_err:.2e})"
    # the same contract as both references (torch_backend rounds scores and probabilities to a bfloat16 cache's dtype)
    assert rel(out, ref) < 10 * TOL and rel(out, mqa_attention(q, kv, meta, scale, c)) < (
        10 * TOL if kv_dtype == torch.float32 else 3e-2), f"seed {seed}"


def attention_f64(q: torch.Tensor, kv: torch.Tensor, meta: AttnMeta, scale: float, c: int) -> torch.Tensor:
    """mla_attention_ref's math in float64: what float32 kernels approach."""
    out = torch.zeros(q.shape[0], q.shape[1], c, dtype=torch.float64)
    for b, s, e in meta.sequences():
        rows = kv[meta.seq_slots(b)].double()
        scores = torch.einsum("thd,sd->ths", q[s:e].double(), rows) * scale
        out[s:e] = scores.masked_fill(~meta.seq_mask(b)[:, None], float("-inf")).softmax(-1) @ rows[:, :c]
    return out


def test_mla_attention_padding_and_queries_that_see_nothing(isa: str) -> None:
    g = torch.Generator().manual_seed(0)
    q, kv, meta = attn_case(g, [0, 7], [2, 3], True, 2, 16, 8, pad=3)  # rows 5..7 belong to no sequence
    mask = meta.tree_mask.clone()
    mask[1] = False  # sequence 0's second query sees no key: its context is empty
    out = fused.mla_attention(q, kv, meta.block_table, meta.ctx_lens, meta.cu_q, mask, 0.3, 16, isa=isa)
    ref = fused.mla_attention_ref(q, kv, meta.block_table, meta.ctx_lens, meta.cu_q, mask, 0.3, 16)
    assert out[1].isnan().all() and ref[1].isnan().all() and not out[5:].any()
    keep = torch.tensor([0, 2, 3, 4, 5, 6, 7])
    assert rel(out[keep], ref[keep]) < TOL


def absorb_case(g: torch.Generator, t: int) -> tuple[torch.Tensor, ...]:
    h, dn, dv, c = rand_dim(g, 5), rand_dim(g, 70), rand_dim(g, 70), rand_dim(g, 300)
    block = [(128, 128), (32, 32), (16, 48)][int(torch.randint(3, (1,), generator=g))]
    offset = (int(torch.randint(block[0], (1,), generator=g)), int(torch.randint(block[1], (1,), generator=g)))
    w, s = quantized(g, h * (dn + dv), c, block, offset)
    return wide(g, t, h, dn), wide(g, t, h, c), w, s, block, offset, dn, dv


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 16])
def test_fp8_absorb_products(seed: int, isa: str, t: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q_nope, o_lat, *kvb = absorb_case(g, t)
    h, c, dv = q_nope.shape[1], kvb[0].shape[1], kvb[-1]
    q_lat = fused.fp8_absorb_q(q_nope, *kvb, isa=isa)
    assert q_lat.shape == (t, h, c) and rel(q_lat, fused.fp8_absorb_q_ref(q_nope, *kvb)) < TOL, f"seed {seed}"
    o = fused.fp8_absorb_o(o_lat, *kvb, isa=isa)
    assert o.shape == (t, h, dv) and rel(o, fused.fp8_absorb_o_ref(o_lat, *kvb)) < TOL, f"seed {seed}"
    q = torch.full((t, h, c + 7), 9.0)  # q_lat straight into the attention's query, beside q_pe
    assert fused.fp8_absorb_q(q_nope, *kvb, out=q[..., :c], isa=isa).data_ptr() == q.data_ptr()
    assert torch.equal(q[..., :c], q_lat) and (q[..., c:] == 9).all()
    y = fused.fp8_absorb_q(q_nope.bfloat16(), *kvb, isa=isa)
    assert y.dtype == torch.bfloat16 and rel(y, fused.fp8_absorb_q_ref(q_nope.bfloat16(), *kvb)) < BF16_TOL


def test_fp8_absorb_head_shards_equal_the_whole(seed: int, isa: str) -> None:
    # a tensor-parallel rank holds heads h0:h1, its kv_b rows starting inside a 128-block with a copy of its scale
    g = torch.Generator().manual_seed(seed)
    h, dn, dv, c = 6, 40, 24, 200
    w, s = quantized(g, h * (dn + dv), c)
    q_nope, o_lat = torch.randn(3, h, dn, generator=g), torch.randn(3, h, c, generator=g)
    args = ((128, 128), (0, 0), dn, dv)
    whole_q, whole_o = fused.fp8_absorb_q(q_nope, w, s, *args, isa=isa), fused.fp8_absorb_o(o_lat, w, s, *args, isa=isa)
    h0, h1 = 1, 4
    r0, r1 = h0 * (dn + dv), h1 * (dn + dv)
    shard = (w[r0:r1].contiguous(), s[r0 // 128:-(-r1 // 128)].contiguous(), (128, 128), (r0 % 128, 0), dn, dv)
    assert torch.equal(fused.fp8_absorb_q(q_nope[:, h0:h1].contiguous(), *shard, isa=isa), whole_q[:, h0:h1])
    assert torch.equal(fused.fp8_absorb_o(o_lat[:, h0:h1].contiguous(), *shard, isa=isa), whole_o[:, h0:h1])


def fused_calls(g: torch.Generator, isa: str, big: bool) -> list:
    """One call of every op on fresh inputs (big: enough rows, heads or pairs that two threads split them)."""
    t = 300 if big else 3
    x, res, w = torch.randn(t, 256, generator=g), torch.randn(t, 256, generator=g), torch.randn(256, generator=g)
    cos, sin = torch.randn(t, 32, generator=g), torch.randn(t, 32, generator=g)
    q_pe = torch.randn(t, 4, 64, generator=g)
    lg, bias = torch.randn(t, 16, generator=g), torch.randn(16, generator=g) * 0.1
    q, kv, meta = attn_case(g, [40, 3, 0], [2, 5, 1], True, 4, 32, 16)
    q_nope, o_lat, *kvb = absorb_case(g, 4)
    return [
        lambda: fused.rms_norm(x, w, 1e-6, isa=isa),
        lambda: fused.add_rms_norm(x, res, w, 1e-6, isa=isa),
        lambda: fused.rope(q_pe, cos, sin, isa=isa),
        lambda: fused.silu_mul(x, isa=isa),
        lambda: fused.moe_route(lg, None, bias, 4, 2, 2, True, 2.5, isa=isa),
        lambda: fused.mla_attention(q, kv, meta.block_table, meta.ctx_lens, meta.cu_q, meta.tree_mask, 0.1, 32,
                                    isa=isa),
        lambda: fused.fp8_absorb_q(q_nope, *kvb, isa=isa),
        lambda: fused.fp8_absorb_o(o_lat, *kvb, isa=isa),
    ]


def test_two_threads_give_the_same_bits(seed: int, isa: str, two_threads: None) -> None:
    # every output element is computed by one thread in one order, whichever splits the work
    calls = fused_calls(torch.Generator().manual_seed(seed), isa, big=True)
    two = [call() for call in calls]
    torch.set_num_threads(1)
    for i, (call, out) in enumerate(zip(calls, two)):
        one = call()
        assert all(torch.equal(a, b) for a, b in zip(one, out)) if isinstance(one, tuple) else torch.equal(one, out), \
            f"seed {seed}: op {i}"


def test_bad_inputs_are_one_line_value_errors() -> None:
    g = torch.Generator().manual_seed(0)
    x, w, cs, buf = torch.randn(2, 8), torch.randn(8), torch.randn(2, 4), torch.randn(2, 12)
    q, kv, meta = attn_case(g, [5, 2], [1, 2], False, 2, 16, 8)
    bt, ctx, cu, tm = meta.block_table, meta.ctx_lens, meta.cu_q, meta.tree_mask
    base = dict(q=q, kv_cache=kv, block_table=bt, ctx_lens=ctx, cu_q=cu, tree_mask=tm, scale=0.1, c=16)
    attend = lambda **kw: fused.mla_attention(**(base | kw))
    q_nope, o_lat, kw, ks, block, offset, dn, dv = absorb_case(g, 2)
    absorb = (kw, ks, block, offset, dn, dv)
    cases = [
        (lambda: fused.rms_norm(x.double(), w, 1e-6), "rms_norm: x must be float32 or bfloat16"),
        (lambda: fused.rms_norm(x[:, :7], w, 1e-6), r"rms_norm: w must be \[7\]"),
        (lambda: fused.rms_norm(x.t(), w[:2], 1e-6), "rms_norm: x's last dimension must be contiguous"),
        (lambda: fused.rms_norm(x, w, 1e-6, isa="sse2"), "rms_norm: isa='sse2' is not one of"),
        (lambda: fused.add_rms_norm(x, x[:1], w, 1e-6), "add_rms_norm: residual must match x"),
        (lambda: fused.rope(x[:, :7], cs, cs), r"rope: x's last dimension \(R = 7\) must be even"),
        (lambda: fused.rope(x, cs[:, :3], cs), r"rope: cos must be float32 \[2, 4\]"),
        (lambda: fused.rope(x, cs, cs, out=x.bfloat16()), "rope: out must be Float"),
        (lambda: fused.rope(x, cs, cs, out=w.expand(2, 8)), "rope: out must not have elements that share memory"),
        (lambda: fused.rope(buf[:, :8], cs, cs, out=buf[:, 4:]), "rope: out must be x itself .* or apart from it"),
        (lambda: fused.silu_mul(x[:, :7]), r"silu_mul: h must be \[T, 2I\]"),
        (lambda: fused.moe_route(x, None, w[:7], 1, 1, 2, True, 1.0), r"moe_route: bias must be \[8\]"),
        (lambda: fused.moe_route(x, None, w, 3, 1, 2, True, 1.0), "moe_route: n_group=3 must split the 8 experts"),
        (lambda: fused.moe_route(x, None, w, 4, 5, 2, True, 1.0), "moe_route: topk_group=5 must be in"),
        (lambda: fused.moe_route(x, None, w, 4, 1, 3, True, 1.0), r"moe_route: top_k=3 must be in \[1, 2\]"),
        (lambda: fused.moe_route(x, torch.randn(8, 9), w, 1, 1, 2, True, 1.0), "moe_route: gate_w must be"),
        (lambda: attend(block_table=bt + 100), r"mla_attention: block_table\[0, 0\] = \d+ is not a slot of kv_cache"),
        (lambda: attend(cu_q=cu + 1), r"mla_attention: cu_q\[0\] must be 0"),
        (lambda: attend(cu_q=torch.tensor([0, 2, 1])), "mla_attention: cu_q must rise"),
        (lambda: attend(ctx_lens=ctx + 50), "mla_attention: sequence 0 has 55 cached and 1 new keys"),
        (lambda: attend(tree_mask=tm[:2]), r"mla_attention: tree_mask must be \[3, N\]"),
        (lambda: attend(tree_mask=tm.int()), "mla_attention: tree_mask must be a 2-D Bool"),
        (lambda: attend(ctx_lens=ctx.int()), "mla_attention: ctx_lens must be a 1-D Long"),
        (lambda: attend(kv_cache=kv[:, :20]), r"mla_attention: kv_cache must be .* \[slots, 24\]"),
        (lambda: attend(c=25), r"mla_attention: c=25 must be in \[1, 24\]"),
        (lambda: fused.fp8_absorb_q(q_nope, kw.float(), *absorb[1:]), "fp8_absorb_q: w must be a 2-D Float8"),
        (lambda: fused.fp8_absorb_q(q_nope, *absorb[:4], dn + 1, dv), r"fp8_absorb_q: q_nope must be \[T, H, "),
        (lambda: fused.fp8_absorb_q(q_nope, *absorb[:5], dv + 1), r"fp8_absorb_q: w must be \[H \(dn \+ dv\)"),
        (lambda: fused.fp8_absorb_q(q_nope, *absorb, out=o_lat[..., 1:]), "fp8_absorb_q: out must be"),
        (lambda: fused.fp8_absorb_o(o_lat[..., 1:], *absorb), "fp8_absorb_o: o_lat must be"),
        (lambda: fused.fp8_absorb_o(o_lat, kw, ks[:, 1:].contiguous(), *absorb[2:]), r"fp8_absorb_o: s must be \["),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value), str(err.value)


def test_tensors_off_the_cpu_are_refused() -> None:
    # a GPU tensor reaches the kernels (registered for every backend) and meets their device check; here the CPU
    # kernel is called on a meta tensor directly, past the fake implementation that meta tensors dispatch to
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    x, w = torch.randn(2, 8), torch.randn(8, device="meta")
    with pytest.raises(ValueError, match="rms_norm: w must be on the CPU, got meta"):
        torch.ops.specdec.rms_norm.default.redispatch(cpu, x, w, 1e-6, "auto")
    with pytest.raises(ValueError, match="mla_attention: kv_cache must be on the CPU, got meta"):
        torch.ops.specdec.mla_attention.default.redispatch(cpu, torch.randn(1, 1, 8), w.view(1, 8), *(
            torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.tensor([0, 1]),
            torch.ones(1, 1, dtype=torch.bool)), 0.1, 4, "auto")


def test_compiled_and_traced_steps_call_each_op_once(seed: int) -> None:
    # one layer's worth of calls, the out= forms writing q_lat and q_pe into one query buffer, as a step would
    g = torch.Generator().manual_seed(seed)
    t, h, dn, dv, c, r = 3, 2, 16, 8, 32, 16
    w, s = quantized(g, h * (dn + dv), c)
    kvb = (w, s, (128, 128), (0, 0), dn, dv)
    norm_w, bias = torch.randn(64, generator=g), torch.randn(16, generator=g) * 0.1
    cos, sin = torch.randn(t, r // 2, generator=g), torch.randn(t, r // 2, generator=g)
    _, kv, meta = attn_case(g, [9], [t], True, h, c, r)
    attn_meta = (meta.block_table, meta.ctx_lens, meta.cu_q, meta.tree_mask)

    def step(x: torch.Tensor, res: torch.Tensor, q_nope: torch.Tensor, q_pe: torch.Tensor,
             q: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normed, total = fused.add_rms_norm(x, res, norm_w, 1e-6)
        fused.fp8_absorb_q(q_nope, *kvb, out=q[..., :c])
        fused.rope(q_pe, cos, sin, out=q[..., c:])
        o = fused.fp8_absorb_o(fused.mla_attention(q, kv, *attn_meta, 0.2, c), *kvb)
        weights, ids = fused.moe_route(normed[:, :16], None, bias, 4, 2, 2, True, 2.5)
        return fused.rms_norm(total, norm_w, 1e-6), fused.silu_mul(normed), o, weights, ids

    inputs = [torch.randn(t, 64, generator=g), torch.randn(t, 64, generator=g), torch.randn(t, h, dn, generator=g),
              torch.randn(t, h, r, generator=g)]
    eager = step(*inputs, torch.zeros(t, h, c + r))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs, torch.zeros(t, h, c + r))
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
    x, res, q_nope, q_pe = inputs
    q = torch.zeros(t, h, c + r)
    checks = {"rms_norm": (x, norm_w, 1e-6), "add_rms_norm": (x, res, norm_w, 1e-6), "silu_mul": (x,),
              "rope_into": (q_pe, cos, sin, q[..., c:]), "moe_route": (x[:, :16], None, bias, 4, 2, 2, True, 2.5),
              "mla_attention": (q, kv, *attn_meta, 0.2, c), "fp8_absorb_o": (q[..., :c], w, s, dn, dv),
              "fp8_absorb_q_into": (q_nope, w, s, dn, dv, 128, 128, 0, 0, q[..., :c])}
    graph = torch.fx.symbolic_trace(step).graph
    ops = [str(n.target) for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("specdec.")]
    assert sorted(ops) == sorted(f"specdec.{op}.default" for op in checks)
    checks |= {"rope": (q_pe, cos, sin), "fp8_absorb_q": (q_nope, w, s, dn, dv)}  # the forms without out
    for op, args in checks.items():
        torch.library.opcheck(getattr(torch.ops.specdec, op), args,
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


def test_bench_times_every_op_against_its_torch_code() -> None:
    path = Path(__file__).parents[1] / "bench" / "cpu_ops_bench.py"
    spec = importlib.util.spec_from_file_location("cpu_ops_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = ModelConfig.from_dict(json.loads(bench.CONFIG.read_text()))
    rows = bench.fused_table(cfg, (1,), 0.002)
    ops = {row[0] for row in rows}
    assert {"rms_norm D=8 (the floor)", "mla_attention context 2048"} <= ops and len(ops) == 11, ops
    assert all(sorted(r[2] for r in rows if r[0] == op) == sorted([*cpu_ops.isas(), "torch"]) for op in ops)
