"""MLA attention over the latent cache (absorbed form), for decode, chains and token trees.

Queries are already absorbed: q_lat = q_nope @ W_UK lives in the latent space [.., kv_lora_rank]. Every cached row
is [latent (C) | rotated k_pe (R)]; the latent is both the key (with q_lat) and the value. The caller applies W_UV.

`mla_attention_ref` is the plain-torch reference; `mla_attention` is the Triton kernel (split-KV, log-sum-exp merge);
`mla_attention_padded` is plain torch at fixed shapes, the torch backend's path inside a captured step. A captured
step's metadata (AttnMeta.captured) holds only bounds on the host: the Triton kernel sizes its splits from the bound
and reads each sequence's length on the device, as it always does.
"""

from __future__ import annotations

import math

import torch

from .attn_meta import AttnMeta
from .triton_util import cdiv, check_device, interpreting, lazy_jit, pow2, sm_count, tl, upcast


def mla_attention_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta,
                      scale: float) -> torch.Tensor:
    """q_lat [T, H, C], q_pe [T, H, R], kv_cache [slots, C + R] -> [T, H, C] (float32)."""
    c = q_lat.shape[-1]
    out = torch.empty(q_lat.shape, dtype=torch.float32, device=q_lat.device)
    for b in range(meta.num_seqs):
        s, e = meta.host_cu_q[b], meta.host_cu_q[b + 1]
        if s == e:
            continue
        kv = kv_cache[meta.seq_slots(b)].float()  # [S, C+R]
        scores = torch.einsum("thc,sc->ths", q_lat[s:e].float(), kv[:, :c])
        scores += torch.einsum("thr,sr->ths", q_pe[s:e].float(), kv[:, c:])
        scores = (scores * scale).masked_fill(~meta.seq_mask(b)[:, None, :], float("-inf"))
        out[s:e] = torch.einsum("ths,sc->thc", scores.softmax(-1), kv[:, :c])
    return out


def mla_attention_padded(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta,
                         scale: float) -> torch.Tensor:
    """mla_attention_ref's contract for B sequences of n new tokens each (T = B * n; a captured step's shape), at
    fixed shapes and without reading a length on the host: every sequence attends over its whole block-table row
    [W] with the keys it may not see masked on the device (from ctx_lens and tree_mask), so it costs W keys
    whatever its length. Float32 throughout."""
    t, h, c = q_lat.shape
    b, w = meta.block_table.shape
    n = t // b
    kv = kv_cache[meta.block_table].float()  # [B, W, C+R]
    q = torch.cat([q_lat, q_pe], -1).float().view(b, n * h, -1)
    scores = torch.bmm(q, kv.transpose(1, 2)).view(b, n, h, w) * scale
    j = torch.arange(w, device=kv.device) - meta.ctx_lens[:, None]  # [B, W]: index among the new keys
    tree = meta.tree_mask.view(b, n, -1).gather(2, j.clamp(0, n - 1)[:, None, :].expand(b, n, w))
    visible = (j < 0)[:, None, :] | (tree & (j < n)[:, None, :])  # [B, n, W]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf")).softmax(-1)
    return torch.bmm(scores.view(b, n * h, w), kv[..., :c]).view(t, h, c)


# ---------------------------------------------------------------------------------------------------------------
# Triton


@lazy_jit
def _mla_kernel(q_ptr, qpe_ptr, kv_ptr, bt_ptr, ctx_ptr, cuq_ptr, tm_ptr, o_ptr, lse_ptr, H, C, R, CHUNK, scale_log2,
                stride_qt, stride_qh, stride_pt, stride_ph, stride_kv, stride_bt, stride_tmt, stride_tmj,
                stride_os, stride_ls,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    # program (m, b, s): query rows m*BLOCK_M.. of sequence b's n_b*H (token, head) rows, keys s*CHUNK..+CHUNK.
    # m varies fastest so the row blocks reading the same keys run together and share them through L2.
    # q [T, H, C], qpe [T, H, R], kv [slots, C+R], bt [B, S], tm [T, N] uint8. Output rows are t*H + h.
    # SPLIT: o [S, T*H, C] f32 partials (normalized) and lse [S, T*H] (log2 domain); else o [T*H, C] final.
    m, b, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(cuq_ptr + b)
    n_new = tl.load(cuq_ptr + b + 1) - q0
    if m * BLOCK_M >= n_new * H:
        return
    ctx = tl.load(ctx_ptr + b)
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_new * H
    t = (q0 + rows // H).to(tl.int64)  # [BLOCK_M] global query token; int64 offsets: t * stride_qt passes 2^31
    h = rows % H
    rc, rr = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    cmask, pmask = rc < C, rr < R
    q = tl.load(q_ptr + t[:, None] * stride_qt + h[:, None] * stride_qh + rc[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0)
    qpe = tl.load(qpe_ptr + t[:, None] * stride_pt + h[:, None] * stride_ph + rr[None, :],
                  mask=rmask[:, None] & pmask[None, :], other=0.0)
    if UPCAST:
        q, qpe = q.to(tl.float32), qpe.to(tl.float32)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, ctx + n_new)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        kmask = keys < end
        slot = tl.load(bt_ptr + b * stride_bt + keys, mask=kmask, other=0).to(tl.int64)
        kv = tl.load(kv_ptr + slot[:, None] * stride_kv + rc[None, :], mask=kmask[:, None] & cmask[None, :],
                     other=0.0)  # [BLOCK_N, BLOCK_C]: keys and values
        kpe = tl.load(kv_ptr + slot[:, None] * stride_kv + C + rr[None, :], mask=kmask[:, None] & pmask[None, :],
                      other=0.0)
        if UPCAST:
            kv, kpe = kv.to(tl.float32), kpe.to(tl.float32)
        sc = tl.dot(q, tl.trans(kv), input_precision="ieee")
        sc = tl.dot(qpe, tl.trans(kpe), sc, input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        j = keys - ctx  # index among the new keys
        new = kmask & (j >= 0)
        tree = tl.load(tm_ptr + t[:, None] * stride_tmt + j[None, :] * stride_tmj, mask=rmask[:, None] & new[None, :],
                       other=0)
        visible = (kmask & (j < 0))[None, :] | (tree != 0)
        sc = tl.where(visible, sc * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    orow = t * H + h
    tl.store(o_ptr + s.to(tl.int64) * stride_os + orow[:, None] * C + rc[None, :], out,
             mask=rmask[:, None] & cmask[None, :])
    if SPLIT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + s.to(tl.int64) * stride_ls + orow, lse, mask=rmask)


@lazy_jit
def _mla_merge_kernel(po_ptr, lse_ptr, o_ptr, S, C, stride_ps, stride_ls,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # po [S, rows, C] f32 partials, lse [S, rows] log2 -> o [rows, C]; one program per row
    r = tl.program_id(0).to(tl.int64)  # int64: r * C and s * stride_ps pass 2^31 in long prefills
    rs, rc = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_C)
    lse = tl.load(lse_ptr + rs.to(tl.int64) * stride_ls + r, mask=rs < S, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    denom = tl.maximum(tl.sum(tl.exp2(lse - mx), axis=0), 1e-30)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    po, ls = po_ptr + r * C + rc, lse_ptr + r  # stepped by the strides: s * stride_ps would pass 2^31 in int32
    for _ in range(0, S):  # one [C] partial at a time keeps registers small at 64 splits x 512
        w = tl.exp2(tl.load(ls) - mx) / denom
        acc += w * tl.load(po, mask=rc < C, other=0.0)
        po += stride_ps
        ls += stride_ls
    tl.store(o_ptr + r * C + rc, acc, mask=rc < C)


def mla_tiles(max_rows: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M query rows, BLOCK_N keys, warps, stages) for up to max_rows (token, head) rows per sequence. At
    C = 512 on sm_90 (kernels/aot.py): 16-bit inputs use 57 KB of shared memory and 190-194 registers, no spills;
    float32 75 KB, no spills (the 16-bit tiles would need 190-230 KB and spill 9-18 KB per thread)."""
    if interpreting():
        return min(pow2(max_rows, 16), 64), 32, 4, 2
    if dtype == torch.float32:
        return 16, 16, 8, 2
    return (16, 32, 8, 2) if max_rows <= 16 else (32, 16, 8, 2)


def mla_splits(meta: AttnMeta, rows_blocks: int, device: torch.device) -> int:
    """How many KV splits: enough programs to fill the GPU twice, chunks of at least 256 keys (of meta.longest: a
    captured step's bound)."""
    sms = sm_count(device)
    if sms == 1:
        return 1
    want = cdiv(2 * sms, max(1, meta.num_seqs * rows_blocks))
    return max(1, min(want, cdiv(meta.longest, 256), 64))


def mla_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta, scale: float,
                  num_splits: int | None = None) -> torch.Tensor:
    """Triton MLA over the latent cache, same contract as mla_attention_ref: q_lat [T, H, C], q_pe [T, H, R],
    kv_cache [slots, C + R] -> [T, H, C] float32. Each sequence's keys are cut into num_splits chunks (default:
    chosen from the batch and the GPU) whose partial results merge by log-sum-exp; a captured step's chunks are cut
    from its bound, so a short sequence leaves the later ones empty. Float32 inputs multiply in full
    IEEE precision; 16-bit inputs on tensor cores with float32 accumulation."""
    t, h, c = q_lat.shape
    r = q_pe.shape[-1]
    if q_pe.shape[:2] != (t, h) or kv_cache.shape[-1] != c + r or meta.tree_mask.shape[0] != t:
        raise ValueError(f"mla_attention: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, kv_cache "
                         f"{tuple(kv_cache.shape)}, tree_mask {tuple(meta.tree_mask.shape)} do not fit together")
    check_device(q_lat, q_pe, kv_cache)
    if q_lat.stride(-1) != 1 or q_pe.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        q_lat, q_pe, kv_cache = q_lat.contiguous(), q_pe.contiguous(), kv_cache.contiguous()
    if q_pe.dtype != q_lat.dtype or kv_cache.dtype != q_lat.dtype:
        raise ValueError(f"mla_attention: q_lat, q_pe, kv_cache dtypes differ ({q_lat.dtype}, {q_pe.dtype}, "
                         f"{kv_cache.dtype})")
    out = torch.empty(t, h, c, dtype=torch.float32, device=q_lat.device)
    max_rows = meta.max_new * h
    if t == 0 or max_rows == 0:
        return out
    block_m, block_n, warps, stages = mla_tiles(max_rows, q_lat.dtype)
    m_blocks = cdiv(max_rows, block_m)
    splits = num_splits or mla_splits(meta, m_blocks, q_lat.device)
    chunk = cdiv(cdiv(meta.longest, splits), block_n) * block_n  # splits past a sequence's end return at once
    tm = meta.tree_mask.view(torch.uint8) if meta.tree_mask.dtype == torch.bool else meta.tree_mask.to(torch.uint8)
    bt = meta.block_table
    if splits > 1:
        po = torch.empty(splits, t * h, c, dtype=torch.float32, device=q_lat.device)
        lse = torch.empty(splits, t * h, dtype=torch.float32, device=q_lat.device)
    else:
        po, lse = out, out  # lse unused
    _mla_kernel[(m_blocks, meta.num_seqs, splits)](
        q_lat, q_pe, kv_cache, bt, meta.ctx_lens, meta.cu_q, tm, po, lse, h, c, r, chunk, scale * math.log2(math.e),
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv_cache.stride(0), bt.stride(0),
        tm.stride(0), tm.stride(1), po.stride(0) if splits > 1 else 0, lse.stride(0) if splits > 1 else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=pow2(c, 16), BLOCK_R=pow2(r, 16), SPLIT=splits > 1,
        UPCAST=upcast(q_lat.dtype), num_warps=warps, num_stages=stages)
    if splits > 1:
        _mla_merge_kernel[(t * h,)](po, lse, out, splits, c, po.stride(0), lse.stride(0), BLOCK_S=pow2(splits),
                                    BLOCK_C=pow2(c))
    return out
