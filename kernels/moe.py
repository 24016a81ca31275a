"""Routed-expert MoE compute: tokens x chosen experts -> weighted sum of SiLU-gated expert MLPs.

`moe_ref` is the plain-torch reference; `moe` is the fused Triton version: routed rows sorted by expert into
block-aligned runs (`moe_align`), one grouped GEMM for gate+up with SiLU*up in its epilogue, one grouped GEMM for down
with the router weight in its epilogue, then a sum over each token's K rows. FP8 weights run W8A8 like `fp8_linear`
(`moe_w8a8_ref` states exactly what that computes). `moe_gather` is plain torch at fixed shapes, the torch
backend's path inside a captured step (the Triton path is capturable as it is: moe_align reads nothing back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import act_quant, act_quant_ref, gemm_block_k, weight_dequant_ref
from .triton_util import cdiv, check_device, config, lazy_jit, pow2, tl, upcast


def moe_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
            s13: torch.Tensor | None = None, s2: torch.Tensor | None = None,
            block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """x [T, D]; topk_ids [T, K] local expert ids, -1 = not on this rank; topk_w [T, K] float32;
    w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I], FP8 with block scales or plain. FP8 scales:
    s13 [E, 2 * ceil(I/bn), ceil(D/bk)] holds the gate grid then the up grid (each half blocked on its own, so a
    partial last block of I stays inside its half); s2 [E, ceil(D/bn), ceil(I/bk)].
    Returns sum_k topk_w[t, k] * expert_k(x[t]) as [T, D] in x's dtype. Experts with no tokens cost nothing."""
    t, k = topk_ids.shape
    e_count = w13.shape[0]
    flat = topk_ids.reshape(-1)
    valid = flat >= 0
    order = torch.argsort(torch.where(valid, flat, e_count), stable=True)
    counts = torch.bincount(flat[valid], minlength=e_count).tolist()  # the one host sync
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = order[start:start + n]
        start += n
        a = w13[e] if s13 is None else dequant_w13(w13[e], s13[e], block, x.dtype)
        b = w2[e] if s2 is None else weight_dequant_ref(w2[e], s2[e], *block, dtype=x.dtype)
        tok = idx // k
        xe = x[tok]
        gate, up = F.linear(xe, a).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, b)
        out.index_add_(0, tok, y.float() * topk_w.reshape(-1)[idx, None])
    return out.to(x.dtype)


def dequant_w13(w13: torch.Tensor, s13: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """One expert's fused gate+up weight [2I, D] from FP8 with per-half block scales (see moe_ref)."""
    i, g = w13.shape[0] // 2, s13.shape[0] // 2
    return torch.cat([weight_dequant_ref(w13[:i], s13[:g], *block, dtype=dtype),
                      weight_dequant_ref(w13[i:], s13[g:], *block, dtype=dtype)])


def moe_gather(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor) -> torch.Tensor:
    """moe_ref's contract for plain weights, at fixed shapes and without reading anything back: each routed
    (token, expert) pair gathers its expert's weights (w13[ids], w2[ids]: T * K experts' worth of memory, an expert
    chosen twice is read twice), so no grouping needs the counts on the host. Ids -1 contribute nothing."""
    t, k = topk_ids.shape
    i = w2.shape[2]
    e = topk_ids.clamp(min=0).reshape(-1)
    h = torch.bmm(w13[e], x.repeat_interleave(k, 0)[:, :, None])[..., 0]  # [T*K, 2I]
    y = torch.bmm(w2[e], (F.silu(h[:, :i]) * h[:, i:])[:, :, None])[..., 0]  # [T*K, D]
    w = torch.where(topk_ids >= 0, topk_w.float(), 0.0).reshape(-1, 1)
    return (y.float() * w).view(t, k, -1).sum(1).to(x.dtype)


def moe_w8a8_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 s13: torch.Tensor, s2: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """What the Triton kernel computes for FP8 weights (W8A8): moe_ref with x and the SiLU*up activations quantized
    to e4m3 in 1 x block_k groups (as act_quant does) before each grouped GEMM, activations kept in x's dtype."""
    t, k = topk_ids.shape
    bk = block[1]

    def quant(a: torch.Tensor) -> torch.Tensor:
        q, s = act_quant_ref(a, bk)
        return (q.float() * s.repeat_interleave(bk, 1)[:, : a.shape[1]]).to(a.dtype)

    xq = quant(x)
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        idx = (topk_ids.reshape(-1) == e).nonzero()[:, 0]
        if idx.numel() == 0:
            continue
        tok = idx // k
        a = dequant_w13(w13[e], s13[e], block, torch.float32)
        b = weight_dequant_ref(w2[e], s2[e], *block, dtype=torch.float32)
        gate, up = (xq[tok].float() @ a.T).chunk(2, dim=-1)
        h = quant((F.silu(gate) * up).to(x.dtype)).float()
        out.index_add_(0, tok, (h @ b.T) * topk_w.reshape(-1)[idx, None].float())
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group routed rows by expert, without a host sync.

    topk_ids [T, K] (-1 = expert not on this rank) -> (rows [P] int32, block_expert [P / block_m] int32). rows holds
    the flat row ids t*K + k of expert 0, then expert 1, ..., each expert's run padded to a multiple of block_m with
    the sentinel T*K; block_expert[i] is the expert of rows[i*block_m:(i+1)*block_m], -1 past the last used block.
    P = T*K + min(E, T*K) * (block_m - 1), rounded up to block_m, bounds the padded total, so an expert without
    rows gets no block and costs nothing but a program that returns at once."""
    flat = topk_ids.reshape(-1)
    n, dev = flat.numel(), flat.device
    key = torch.where(flat >= 0, flat, n_experts).long()  # absent rows sort last
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    # [E+1] rows per key (CUDA bincount reads its input's max on the host: a sync)
    padded = (counts[:n_experts] + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    p = cdiv(n + min(n_experts, n) * (block_m - 1), block_m) * block_m
    starts = torch.cat([ends - padded, torch.full((1,), p, dtype=ends.dtype, device=dev)])  # [E+1]
    first = counts.cumsum(0) - counts  # [E+1] first sorted position of each key
    order = torch.argsort(key, stable=True)
    skey = key[order]
    dest = starts[skey] + torch.arange(n, device=dev) - first[skey]  # absent rows land at p (dropped)
    dest = torch.where(skey < n_experts, dest, p)
    rows = torch.full((p + 1,), n, dtype=torch.int32, device=dev)
    rows.scatter_(0, dest, order.to(torch.int32))
    block_expert = torch.searchsorted(ends, torch.arange(0, p, block_m, device=dev), right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return rows[:p], block_expert


def _moe_configs() -> list:
    # (BLOCK_N, warps, stages), the default (also the interpreter's) first: with a few rows per expert the grouped
    # GEMMs stream expert weights, and the N tile sets how many programs share that stream
    return [config(w, s, BLOCK_N=n) for n, w, s in [(64, 4, 4), (128, 4, 3)]]


@lazy_jit(configs=_moe_configs, key=["N", "K", "BLOCK_M", "FP8"])
def _moe_gate_up_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, rows_ptr, bexp_ptr, N, K, n_rows, TOPK,
                        stride_xm, stride_xsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_hm, S_HALF,
                        FP8: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # x [T, K] (fp8 with xs [T, ceil(K/GROUP_K)] when FP8); w [E, 2N, K]: gate rows then up rows, ws [E, 2*S_HALF, ..]
    # h [T*TOPK, N]: row r = t*TOPK + k of this block's expert e gets silu(x_t @ gate_e.T) * (x_t @ up_e.T)
    pid = tl.program_id(0)
    e = tl.load(bexp_ptr + pid).to(tl.int64)  # e * stride_we passes 2^31 at 256 DeepSeek experts
    if e < 0:
        return
    rows = tl.load(rows_ptr + pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows * stride > 2^31
    rmask = rows < n_rows
    tok = rows // TOPK
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + rk[None, :]  # [BLOCK_M, BLOCK_K]
    g_ptrs = w_ptr + e * stride_we + rn[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + N * stride_wn
    s_ptrs = ws_ptr + e * stride_wse + (rn // GROUP_N) * stride_wsn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        kmask = rk < K - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if FP8:
            sa = tl.load(xs_ptr + tok * stride_xsm + k0 // GROUP_K, mask=rmask, other=0.0)
            sg = tl.load(s_ptrs + k0 // GROUP_K, mask=nmask, other=0.0)
            su = tl.load(s_ptrs + S_HALF * stride_wsn + k0 // GROUP_K, mask=nmask, other=0.0)
            acc_g += tl.dot(a, g) * (sa[:, None] * sg[None, :])
            acc_u += tl.dot(a, u) * (sa[:, None] * su[None, :])
        else:
            if UPCAST:
                a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + rows[:, None] * stride_hm + rn[None, :], h.to(h_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


@lazy_jit(configs=_moe_configs, key=["N", "K", "BLOCK_M", "FP8"])
def _moe_down_kernel(h_ptr, hs_ptr, w_ptr, ws_ptr, tw_ptr, y_ptr, rows_ptr, bexp_ptr, N, K, n_rows,
                     stride_hm, stride_hsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym,
                     FP8: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # h [T*TOPK, K] (fp8 with hs when FP8); w [E, N, K] (ws [E, ceil(N/GROUP_N), ceil(K/GROUP_K)]); tw [T*TOPK] f32
    # y [T*TOPK, N] f32: row r of this block's expert e gets tw[r] * (h_r @ w_e.T)
    pid = tl.program_id(0)
    e = tl.load(bexp_ptr + pid).to(tl.int64)  # e * stride_we passes 2^31 at 256 DeepSeek experts
    if e < 0:
        return
    rows = tl.load(rows_ptr + pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: rows * stride > 2^31
    rmask = rows < n_rows
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hm + rk[None, :]
    b_ptrs = w_ptr + e * stride_we + rn[None, :] * stride_wn + rk[:, None]
    s_ptrs = ws_ptr + e * stride_wse + (rn // GROUP_N) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        kmask = rk < K - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if FP8:
            sa = tl.load(hs_ptr + rows * stride_hsm + k0 // GROUP_K, mask=rmask, other=0.0)
            sb = tl.load(s_ptrs + k0 // GROUP_K, mask=nmask, other=0.0)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        else:
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tw = tl.load(tw_ptr + rows, mask=rmask, other=0.0)
    tl.store(y_ptr + rows[:, None] * stride_ym + rn[None, :], acc * tw[:, None], mask=rmask[:, None] & nmask[None, :])


def moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        s13: torch.Tensor | None = None, s2: torch.Tensor | None = None,
        block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Fused Triton MoE with moe_ref's contract (shapes, -1 ids, s13 layout); FP8 weights run W8A8 (moe_w8a8_ref).
    Float32 operands multiply in full IEEE precision (no TF32). Returns [T, D] in x's dtype."""
    t, topk = topk_ids.shape
    e_count, two_i, d = w13.shape
    i = two_i // 2
    fp8 = s13 is not None
    if x.shape != (t, d) or w2.shape != (e_count, d, i) or topk_w.shape != (t, topk):
        raise ValueError(f"moe: x {tuple(x.shape)}, topk {tuple(topk_ids.shape)}/{tuple(topk_w.shape)}, "
                         f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} do not fit together")
    if fp8 != (s2 is not None) or (not fp8 and (w13.dtype != x.dtype or w2.dtype != x.dtype)):
        raise ValueError(f"moe: weights {w13.dtype}/{w2.dtype} need both scales (FP8) or x's dtype {x.dtype}")
    check_device(x, w13, w2)
    n = t * topk
    if n == 0:
        return x.new_zeros(t, d)
    block_m = min(64, pow2(cdiv(n, e_count), 16))
    rows, bexp = moe_align(topk_ids, e_count, block_m)
    grid = lambda cols: lambda meta: (bexp.numel(), cdiv(cols, meta["BLOCK_N"]))
    x = x if x.stride(-1) == 1 else x.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    h = torch.empty(n, i, dtype=x.dtype, device=x.device)
    y = torch.zeros(n, d, dtype=torch.float32, device=x.device)
    if fp8:
        bn, bk = block
        block_k = gemm_block_k(bk)
        a, a_s = act_quant(x, bk)
        s13, s2 = s13.float().contiguous(), s2.float().contiguous()
        _moe_gate_up_kernel[grid(i)](a, a_s, w13, s13, h, rows, bexp, i, d, n, topk, a.stride(0), a_s.stride(0),
                                     w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1), h.stride(0),
                                     s13.shape[1] // 2, FP8=True, GROUP_N=bn, GROUP_K=bk, BLOCK_K=block_k,
                                     UPCAST=False, BLOCK_M=block_m)
        hq, h_s = act_quant(h, bk)
        _moe_down_kernel[grid(d)](hq, h_s, w2, s2, topk_w.float().contiguous(), y, rows, bexp, d, i, n,
                                  hq.stride(0), h_s.stride(0), w2.stride(0), w2.stride(1), s2.stride(0),
                                  s2.stride(1), y.stride(0), FP8=True, GROUP_N=bn, GROUP_K=bk, BLOCK_K=block_k,
                                  UPCAST=False, BLOCK_M=block_m)
    else:
        up, block_k = upcast(x.dtype), 64
        _moe_gate_up_kernel[grid(i)](x, x, w13, w13, h, rows, bexp, i, d, n, topk, x.stride(0), 0, w13.stride(0),
                                     w13.stride(1), 0, 0, h.stride(0), 0, FP8=False, GROUP_N=1, GROUP_K=1,
                                     BLOCK_K=block_k, UPCAST=up, BLOCK_M=block_m)
        _moe_down_kernel[grid(d)](h, h, w2, w2, topk_w.float().contiguous(), y, rows, bexp, d, i, n, h.stride(0),
                                  0, w2.stride(0), w2.stride(1), 0, 0, y.stride(0), FP8=False, GROUP_N=1,
                                  GROUP_K=1, BLOCK_K=block_k, UPCAST=up, BLOCK_M=block_m)
    return y.view(t, topk, d).sum(1).to(x.dtype)
