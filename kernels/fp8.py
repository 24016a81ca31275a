"""FP8 (e4m3) block quantization: activation quant (1 x block), weight dequant (block x block), W8A8 GEMM.

Each function has a plain-torch reference (`*_ref`) and a Triton kernel with a thin launcher of the same signature.
"""

from __future__ import annotations

import torch

from .triton_util import cdiv, check_device, config, interpreting, lazy_jit, pow2, tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def weight_dequant_ref(w: torch.Tensor, s: torch.Tensor, block_n: int = 128, block_k: int = 128,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [N, K] fp8, s [ceil(N/bn), ceil(K/bk)] f32 -> w * s per block, [N, K] in `dtype` (edge blocks partial)."""
    n, k = w.shape
    if s.shape != (cdiv(n, block_n), cdiv(k, block_k)):
        raise ValueError(f"weight scale shape {tuple(s.shape)} does not match weight {tuple(w.shape)} "
                         f"with {block_n}x{block_k} blocks")
    full = s.float().repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]
    return (w.float() * full).to(dtype)


def weight_quant_ref(w: torch.Tensor, block_n: int = 128, block_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of weight_dequant: w [N, K] float -> (fp8 [N, K], scale_inv f32 [ceil(N/bn), ceil(K/bk)])."""
    n, k = w.shape
    nb, kb = cdiv(n, block_n), cdiv(k, block_k)
    pad = torch.zeros(nb * block_n, kb * block_k, dtype=torch.float32, device=w.device)
    pad[:n, :k] = w.float()
    blocks = pad.view(nb, block_n, kb, block_k)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)  # [nb, kb]
    s = amax / FP8_MAX
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(nb * block_n, kb * block_k)[:n, :k]
    return q.to(FP8), s.float()


def act_quant_ref(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], scale f32 [M, ceil(K/block)]) with one scale per 1 x block group."""
    m, k = x.shape
    kb = cdiv(k, block)
    pad = torch.zeros(m, kb * block, dtype=torch.float32, device=x.device)
    pad[:, :k] = x.float()
    g = pad.view(m, kb, block)
    s = g.abs().amax(dim=-1).clamp_min(1e-12) / FP8_MAX  # [M, kb]
    q = (g / s[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, kb * block)[:, :k]
    return q.to(FP8), s


def fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 block_n: int = 128, block_k: int = 128, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A8 block-scaled GEMM: a [M, K] fp8 with a_s [M, ceil(K/bk)], b [N, K] fp8 with b_s -> a @ b.T [M, N]."""
    m, k = a.shape
    a_full = a.float() * a_s.float().repeat_interleave(block_k, 1)[:, :k]
    return (a_full @ weight_dequant_ref(b, b_s, block_n, block_k).T).to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton


@lazy_jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, INTERP: tl.constexpr):
    # x [M, K] -> q [M, K] fp8, s [M, ceil(K/GROUP)]; program (i, g): rows i*BLOCK_M.., group g
    # row offsets in int64: Triton types int arguments below 2^31 as i32, and rows * stride would wrap
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    g = tl.program_id(1)
    lk = tl.arange(0, BLOCK_G)
    rk = g * GROUP + lk
    mask = (rm[:, None] < M) & ((lk < GROUP) & (rk < K))[None, :]
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    # IEEE division (Triton's default f32 divide is approximate) so scales and codes match the reference bitwise
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), 448.0)  # [BLOCK_M]
    y = tl.math.div_rn(x, s[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if INTERP:
        # the interpreter's f32 -> fp8 cast drops the carry into the exponent (31.3 -> 16, not 32): round to the
        # e4m3 grid in f32 first (ulp = 2^(e-3), subnormals share 2^-9) so the cast is exact
        ulp = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.abs(y), 0.015625))) - 3.0)
        y = ((y / ulp + 12582912.0) - 12582912.0) * ulp
    tl.store(q_ptr + rm[:, None] * stride_qm + rk[None, :], y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rm * stride_sm + g, s, mask=rm < M)


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], scale f32 [M, ceil(K/block)]) with one scale per 1 x block group (= act_quant_ref)."""
    if x.dim() != 2:
        raise ValueError(f"act_quant: x must be [M, K], got {tuple(x.shape)}")
    check_device(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    kb = cdiv(k, block)
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, kb, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s
    block_m = 8
    _act_quant_kernel[(cdiv(m, block_m), kb)](x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0), GROUP=block,
                                              BLOCK_M=block_m, BLOCK_G=pow2(block), INTERP=interpreting())
    return q, s


@lazy_jit
def _weight_dequant_kernel(w_ptr, s_ptr, y_ptr, N, K, stride_wn, stride_sn, stride_yn,
                           BN: tl.constexpr, BK: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr):
    # w [N, K] fp8, s [ceil(N/BN), ceil(K/BK)] -> y [N, K]; one program per scale block
    pn, pk = tl.program_id(0), tl.program_id(1)
    ln, lk = tl.arange(0, TILE_N), tl.arange(0, TILE_K)
    rn, rk = (pn * BN + ln).to(tl.int64), pk * BK + lk  # int64 row offsets (see _act_quant_kernel)
    mask = ((ln < BN) & (rn < N))[:, None] & ((lk < BK) & (rk < K))[None, :]
    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pn * stride_sn + pk)
    tl.store(y_ptr + rn[:, None] * stride_yn + rk[None, :], (w * s).to(y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block_n: int = 128, block_k: int = 128,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [N, K] fp8, s [ceil(N/bn), ceil(K/bk)] f32 -> w * s per block, [N, K] in `dtype` (= weight_dequant_ref)."""
    n, k = w.shape
    if s.shape != (cdiv(n, block_n), cdiv(k, block_k)):
        raise ValueError(f"weight scale shape {tuple(s.shape)} does not match weight {tuple(w.shape)} "
                         f"with {block_n}x{block_k} blocks")
    check_device(w, s)
    w = w if w.stride(-1) == 1 else w.contiguous()
    s = s.float()
    y = torch.empty(n, k, dtype=dtype, device=w.device)
    if n and k:
        _weight_dequant_kernel[tuple(s.shape)](w, s, y, n, k, w.stride(0), s.stride(0), y.stride(0), BN=block_n,
                                        BK=block_k, TILE_N=pow2(block_n), TILE_K=pow2(block_k))
    return y


# BLOCK_M -> the (BLOCK_N, warps, stages) candidates, the default first. M up to 16 (decode), 32, 64 (verify
# batches) and 128+ (prefill) each get a BLOCK_M of their own; at the DeepSeek-V3 shapes (N = 576..24576,
# K = 512..18432) what is left to tune is the N tile. On sm_90 every candidate fits shared memory without spilling
# (kernels/aot.py --alternatives; a 128 x 256 tile spilled).
GEMM_TILES = {16: [(64, 4, 5), (128, 4, 4)], 32: [(64, 4, 5), (128, 4, 4)], 64: [(128, 4, 4), (64, 4, 4)],
              128: [(128, 8, 3), (64, 4, 4)]}


def gemm_block_m(m: int) -> int:
    """The M tile of fp8_gemm for m rows: the power-of-two bucket of m, 16 to 128."""
    return min(pow2(m, 16), 128)


def _gemm_configs() -> list:
    return [config(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, tiles in GEMM_TILES.items() for bn, w, s in tiles]


def _gemm_prune(configs: list, named_args: dict, **kwargs: object) -> list:
    bm = gemm_block_m(named_args["M"])
    return [c for c in configs if c.kwargs["BLOCK_M"] == bm]


@lazy_jit(configs=_gemm_configs, key=["M_BUCKET", "N", "K"], prune=_gemm_prune)
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, M_BUCKET,
                     stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                     GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # a [M, K] fp8 with as [M, ceil(K/GROUP_K)]; b [N, K] fp8 with bs [ceil(N/GROUP_N), ceil(K/GROUP_K)];
    # c [M, N] = sum over k tiles of (a_tile @ b_tile.T) * as * bs. BLOCK_K divides GROUP_K, so one scale per tile.
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M * N passes 2^31
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None]  # [BLOCK_K, BLOCK_N]: b.T, K-major
    as_ptrs = as_ptr + rm * stride_asm
    bs_ptrs = bs_ptr + (rn // GROUP_N) * stride_bsn
    mmask, nmask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = k * BLOCK_K
        kmask = rk < K - k0
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        sa = tl.load(as_ptrs + k0 // GROUP_K, mask=mmask, other=0.0)
        sb = tl.load(bs_ptrs + k0 // GROUP_K, mask=nmask, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def gemm_block_k(block_k: int) -> int:
    """The K tile of the FP8 kernels: the largest power of two <= 128 dividing the scale block. At least 32: an FP8
    tl.dot on sm_90 needs K >= 32 (the interpreter would run 16, the GPU compiler rejects it)."""
    bk = min(block_k & -block_k, 128)
    if bk < 32:
        raise ValueError(f"FP8 block_k={block_k}: the Triton FP8 kernels need a multiple of 32")
    return bk


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             block_n: int = 128, block_k: int = 128, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A8 block-scaled GEMM (= fp8_gemm_ref): a [M, K] fp8 with a_s [M, ceil(K/bk)], b [N, K] fp8 with
    b_s [ceil(N/bn), ceil(K/bk)] -> a @ b.T [M, N] in out_dtype, accumulated in float32."""
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or a_s.shape != (m, cdiv(k, block_k)) or b_s.shape != (cdiv(n, block_n), cdiv(k, block_k)):
        raise ValueError(f"fp8_gemm: shapes a {tuple(a.shape)}, a_s {tuple(a_s.shape)}, b {tuple(b.shape)}, "
                         f"b_s {tuple(b_s.shape)} do not fit {block_n}x{block_k} blocks")
    if a.dtype != FP8 or b.dtype != FP8:
        raise ValueError(f"fp8_gemm: operands must be {FP8}, got {a.dtype} and {b.dtype}")
    check_device(a, b)
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    a_s, b_s = a_s.float().contiguous(), b_s.float().contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))
    _fp8_gemm_kernel[grid](a, a_s, b, b_s, c, m, n, k, pow2(m, 16), a.stride(0), a_s.stride(0), b.stride(0),
                           b_s.stride(0), c.stride(0), GROUP_N=block_n, GROUP_K=block_k, BLOCK_K=gemm_block_k(block_k))
    return c
