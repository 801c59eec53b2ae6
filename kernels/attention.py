"""Triton kernels: fused attention forward, forward + JVP, and backward.

Per query row, with tau the softmax scale and an optional additive mask b (scm-reference.md §7):
    s = tau q K^T + b,   p = softmax(s),   o = p V,   lse = logsumexp(s)
Tangents (tq, tK, tV) give, with ds = tau (tq K^T + q tK^T) (the mask is a constant):
    to = (p * ds) V - <p, ds> o + p tV
One pass over the keys with an online softmax keeps, per query block, m_i (row max), l_i (row sum)
and the accumulators
    acc = sum p~ V,   t_acc = sum p~ tV + (p~ * (ds - c)) V,   r_i = sum rowsum(p~ * (ds - c)),
each rescaled by alpha = exp(m_old - m_new). The shift c_i is ds at the key of the running max: it
cancels in to (t_acc - r o) but keeps both terms small when p is peaked, where a large tau would
otherwise lose to to their cancellation; when the max moves, t_acc -= (c' - c) acc, r -= (c' - c) l.
Epilogue: o = acc / l, to = (t_acc - r o) / l, lse = m + log l. Rows without a valid key (l = 0) give
o = 0, to = 0, lse = -inf.
Scores stay in natural units (s = tau q K^T + b, p = exp(s - m)): the max, the exponent and the
backward's exp(s - lse) read the same rounded s, and lse needs no log2 <-> ln round trip (which at
|s| ~ 1e2 already moves p by ~1e-5, and at tau ~ 1e9 overflows). A key the mask excludes is -inf
whatever q K^T is (NaN included), so a row with no valid key is 0 even for a NaN q.
FLOPs per (query, key) pair: forward 2 D + 2 Dv; forward + JVP 6 D + 6 Dv (six tile products).

Two passes above head-dim tile 64 (two_pass): the one pass holds acc and t_acc, two fp32 BLOCK_M x BLOCK_DV
tiles, beside q, tq and the score tiles, more than 255 registers a thread at BLOCK_D = 128 for any tile
of >= 64 rows (NOTES.md section 20). Pass 1 is the forward kernel, also storing the row max m and
its key j (STORE_MAX). Pass 2 (_attn_jvp_kernel) recomputes s, takes p~ = exp(s - m) with m final,
so nothing is rescaled and t_acc is its only tile accumulator. The shift c is ds at j: first computed
from the rows K[j], tK[j], then, from j's key block on, the loop's own ds at j (so that ds - c is 0
there exactly; the blocks before it carry weight only where p is not peaked, below their own rounding).
l, r and t_acc as above, to = (t_acc - r o) / l with pass 1's o. FLOPs: pass 1 2 D + 2 Dv,
pass 2 6 D + 4 Dv, in all 8 D + 6 Dv (the recomputed q K^T: +1/6 at D = Dv); one more exp per pair.

Backward of the primal output (FlashAttention-2): delta = rowsum(do * o), p = exp(s - lse),
dV = p^T dO, dp = dO V^T, ds = p (dp - delta), dQ = tau ds K, dK = tau ds^T Q.
dK/dV run per key block (looping over the query heads that share the key head, so GQA needs no
atomics); dQ runs per query block.

Inputs are (B, H, L, D) with unit stride on D; masks are expanded (zero strides allowed) to
(B, Hq, Lq, Lk), so a key-padding mask (B, 1, 1, Lk) costs no Lq x Lk memory.

Block-sparse (HAS_BLOCKS; scm_fast/ops/attention_blocks.py): the launcher turns the bool blocks
(B, Hq, nQ, nK) into, per config, each tile row's count and ascending list of live tiles (entries
2 x tile + partly-live flag, causal tiles removed; per key tile for dK/dV), and the loops walk that list
instead of every tile, so a dead tile costs nothing. Keys of a partly live tile are checked against
the blocks only with BLOCK_KEYS, i.e. for blocks that are not multiples of the tile (the autotuner
prefers configs that divide them: that check's gather spills, NOTES.md section 26).
"""
import math
import os

import torch
import triton
import triton.language as tl

from scm_fast.ops.attention_blocks import causal_tiles, compact, tile_liveness, tile_lists

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tiles used under the Triton interpreter (tests size sequences around these).
INTERPRET_BLOCK_M = 64
INTERPRET_BLOCK_N = 64


@triton.jit
def _load_bias(ptrs, valid, MASK_IS_BOOL: tl.constexpr):
    """Mask tile as an additive bias (-inf where masked)."""
    if MASK_IS_BOOL:
        keep = tl.load(ptrs, mask=valid, other=0)
        return tl.where(keep != 0, 0.0, float("-inf"))
    return tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _masked_scores(s, valid, ptrs, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """(s + bias, exactly -inf outside `valid` and where the mask excludes the key; the new valid)."""
    if HAS_MASK:
        bias = _load_bias(ptrs, valid, MASK_IS_BOOL)
        valid = valid & (bias != float("-inf"))
        s += bias
    return tl.where(valid, s, float("-inf")), valid


@triton.jit
def _causal_shift(Lq, Lk, BOTTOM_RIGHT: tl.constexpr):
    """0 (top-left) or Lk - Lq (bottom-right): a constexpr choice, so the top-left kernels compile as
    without the option (a runtime shift argument cost sm_80 configs a register: 8 B spills, NOTES.md)."""
    if BOTTOM_RIGHT:
        return Lk - Lq
    return 0


@triton.jit
def _valid_tile(m, n, Lq, Lk, IS_CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """Positions (query m, key n) inside the matrix and, if causal, in the causal window.
    m and n are broadcastable index tiles: (BLOCK_M, 1) and (1, BLOCK_N), or transposed."""
    valid = (m < Lq) & (n < Lk)
    if IS_CAUSAL:  # key j visible to query i iff j <= i + shift (SDPA's top-left: 0; bottom-right: Lk - Lq)
        valid = valid & (n <= m + _causal_shift(Lq, Lk, BOTTOM_RIGHT))
    return valid


@triton.jit
def _walk_range(lo, hi, count_ptr, HAS_BLOCKS: tl.constexpr):
    """Bounds of a loop over one tile row: [lo, hi) in steps of a tile, or with a block mask over the
    row's list of live tiles, [0, its count) (attention_blocks.tile_lists)."""
    if HAS_BLOCKS:
        lo = 0
        hi = tl.load(count_ptr)
    return lo, hi


@triton.jit
def _walk_tile(it, entries_ptr, STEP: tl.constexpr, HAS_BLOCKS: tl.constexpr):
    """(first row or key of the tile, 1 if it is only partly live) at loop index `it`: `it` itself, or with
    a block mask the list's it-th entry, 2 x tile + partly-live flag."""
    start = it
    partial = 0
    if HAS_BLOCKS:
        entry = tl.load(entries_ptr + it)
        start = (entry // 2) * STEP
        partial = entry % 2
    return start, partial


@triton.jit
def _block_valid(valid, m, n, Blocks_base, stride_bm, stride_bn, block_q, block_k, partial,
                 BLOCK_KEYS: tl.constexpr):
    """valid and, in a tile only partly live (partial), the block mask's blocks[m // block_q, n // block_k].
    BLOCK_KEYS is False where no tile can be partly live (blocks that are multiples of the tile:
    _block_args), which saves the gather's registers."""
    if BLOCK_KEYS:
        keep = tl.load(Blocks_base + (m // block_q) * stride_bm + (n // block_k) * stride_bn,
                       mask=valid & (partial == 1), other=1)
        valid = valid & (keep != 0)
    return valid


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, TQ, TK, TV, Mask, Blocks, TileNum, TileIdx, O, TO, LSE, RowMax, ArgMax,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_tqb, stride_tqh, stride_tqm,
    stride_tkb, stride_tkh, stride_tkn, stride_tvb, stride_tvh, stride_tvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_nb, stride_nh, stride_nt, stride_ib, stride_ih, stride_it,
    block_q, block_k,
    stride_ob, stride_oh, stride_om, stride_tob, stride_toh, stride_tom,
    H, GROUP, Lq, Lk, D, DV, tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_BLOCKS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    HAS_TANGENT: tl.constexpr, PDS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, STORE_MAX: tl.constexpr,
):
    """One query block: o, lse and (HAS_TANGENT) to in one pass; STORE_MAX also writes the row max m
    and its key j (pass 1 of the two-pass forward + JVP)."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)  # int64: B x H x L x D may exceed 2^31
    off_h = off_bh % H
    off_hk = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq

    q_off = off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(Q + q_off, mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong (triton 11584): compute in fp32 there
        q = q.to(tl.float32)
    K_base = K + off_b * stride_kb + off_hk * stride_kh
    V_base = V + off_b * stride_vb + off_hk * stride_vh
    Mask_base = Mask + off_b * stride_mb + off_h * stride_mh
    Blocks_base = Blocks + off_b * stride_bb + off_h * stride_bh
    TileNum_base = TileNum + off_b * stride_nb + off_h * stride_nh
    TileIdx_base = TileIdx + off_b * stride_ib + off_h * stride_ih

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if STORE_MAX:
        j_i = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_TANGENT:
        tq_off = off_b * stride_tqb + off_h * stride_tqh + offs_m[:, None] * stride_tqm + offs_d[None, :]
        tq = tl.load(TQ + tq_off, mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            tq = tq.to(tl.float32)
        TK_base = TK + off_b * stride_tkb + off_hk * stride_tkh
        TV_base = TV + off_b * stride_tvb + off_hk * stride_tvh
        t_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        c_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + _causal_shift(Lq, Lk, BOTTOM_RIGHT))  # <= 0: no key
    loop_lo, loop_hi = _walk_range(0, hi, TileNum_base + start_m * stride_nt, HAS_BLOCKS)
    for it in range(loop_lo, loop_hi, 1 if HAS_BLOCKS else BLOCK_N):
        start_n, partial = _walk_tile(it, TileIdx_base + start_m * stride_it, BLOCK_N, HAS_BLOCKS)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kT_mask = (offs_d[:, None] < D) & n_ok[None, :]
        kT = tl.load(K_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kT_mask, other=0.0)
        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION) * tau  # (BLOCK_M, BLOCK_N)
        valid = _valid_tile(offs_m[:, None], offs_n[None, :], Lq, Lk, IS_CAUSAL, BOTTOM_RIGHT)
        mask_ptrs = Mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        valid = _block_valid(valid, offs_m[:, None], offs_n[None, :], Blocks_base, stride_bm, stride_bn, block_q,
                             block_k, partial, BLOCK_KEYS)
        s, valid = _masked_scores(s, valid, mask_ptrs, HAS_MASK, MASK_IS_BOOL)
        tile_max = tl.max(s, 1)
        m_new = tl.maximum(m_i, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: keep p = 0
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_old = l_i * alpha
        l_i = l_old + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if STORE_MAX:
            j_i = tl.where(tile_max > m_i, start_n + tl.argmax(s, 1), j_i)
        if HAS_TANGENT:
            tkT = tl.load(TK_base + offs_n[None, :] * stride_tkn + offs_d[:, None], mask=kT_mask, other=0.0)
            tv = tl.load(TV_base + offs_n[:, None] * stride_tvn + offs_dv[None, :],
                         mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            if UPCAST:
                tkT = tkT.to(tl.float32)
                tv = tv.to(tl.float32)
            ds = tl.dot(tq, kT, input_precision=INPUT_PRECISION)
            ds = tl.dot(q, tkT, ds, input_precision=INPUT_PRECISION) * tau
            at_max = tl.sum(tl.where(offs_n[None, :] == start_n + tl.argmax(s, 1)[:, None], ds, 0.0), 1)
            c_new = tl.where(tile_max > m_i, at_max, c_i)  # ds at the running max (module docstring)
            dc = c_new - c_i
            c_i = c_new
            pds = tl.where(valid, p * (ds - c_new[:, None]), 0.0)
            r_i = r_i * alpha - dc * l_old + tl.sum(pds, 1)
            t_acc = t_acc * alpha[:, None] - dc[:, None] * acc
            t_acc = tl.dot(p.to(tv.dtype), tv, t_acc, input_precision=INPUT_PRECISION)
            if PDS_FP32:  # fp16: p*ds can exceed 65504, keep that product in fp32
                t_acc = tl.dot(pds, v.to(tl.float32), t_acc, input_precision=INPUT_PRECISION)
            else:
                t_acc = tl.dot(pds.to(v.dtype), v, t_acc, input_precision=INPUT_PRECISION)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_off = off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    o_mask = m_ok[:, None] & (offs_dv[None, :] < DV)
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=o_mask)
    lse = tl.where(has_key, m_i + tl.log(l_safe), float("-inf"))
    tl.store(LSE + off_bh * Lq + offs_m, lse, mask=m_ok)
    if STORE_MAX:
        tl.store(RowMax + off_bh * Lq + offs_m, m_i, mask=m_ok)
        tl.store(ArgMax + off_bh * Lq + offs_m, j_i, mask=m_ok)
    if HAS_TANGENT:
        to = (t_acc - r_i[:, None] * o) / l_safe[:, None]
        to_off = off_b * stride_tob + off_h * stride_toh + offs_m[:, None] * stride_tom + offs_dv[None, :]
        tl.store(TO + to_off, to.to(TO.dtype.element_ty), mask=o_mask)


@triton.jit
def _attn_jvp_kernel(
    Q, K, V, TQ, TK, TV, Mask, Blocks, TileNum, TileIdx, O, RowMax, ArgMax, TO,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_tqb, stride_tqh, stride_tqm,
    stride_tkb, stride_tkh, stride_tkn, stride_tvb, stride_tvh, stride_tvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_nb, stride_nh, stride_nt, stride_ib, stride_ih, stride_it,
    block_q, block_k,
    stride_ob, stride_oh, stride_om, stride_tob, stride_toh, stride_tom,
    H, GROUP, Lq, Lk, D, DV, tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_BLOCKS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    PDS_FP32: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Pass 2 of the two-pass forward + JVP (module docstring): one query block's to, from pass 1's
    o, row max m and its key j. With m final nothing is rescaled, so only t_acc is a BLOCK_M x BLOCK_DV
    accumulator (the one-pass kernel also holds acc)."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = off_bh % H
    off_hk = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq
    qd_mask = m_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=qd_mask, other=0.0)
    tq = tl.load(TQ + off_b * stride_tqb + off_h * stride_tqh + offs_m[:, None] * stride_tqm + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        tq = tq.to(tl.float32)
    K_base = K + off_b * stride_kb + off_hk * stride_kh
    V_base = V + off_b * stride_vb + off_hk * stride_vh
    TK_base = TK + off_b * stride_tkb + off_hk * stride_tkh
    TV_base = TV + off_b * stride_tvb + off_hk * stride_tvh
    Mask_base = Mask + off_b * stride_mb + off_h * stride_mh
    Blocks_base = Blocks + off_b * stride_bb + off_h * stride_bh
    TileNum_base = TileNum + off_b * stride_nb + off_h * stride_nh
    TileIdx_base = TileIdx + off_b * stride_ib + off_h * stride_ih
    m_i = tl.load(RowMax + off_bh * Lq + offs_m, mask=m_ok, other=float("-inf"))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)  # a row without a valid key: every p = 0
    # c = ds at the key j of the row max (the shift of the module docstring): first from the rows K[j],
    # tK[j], then, from j's key block on, the loop's own rounding of it (module docstring)
    j = tl.load(ArgMax + off_bh * Lq + offs_m, mask=m_ok, other=0)
    k_j = tl.load(K_base + j[:, None] * stride_kn + offs_d[None, :], mask=qd_mask, other=0.0)
    tk_j = tl.load(TK_base + j[:, None] * stride_tkn + offs_d[None, :], mask=qd_mask, other=0.0)
    c_i = tl.sum(tq.to(tl.float32) * k_j.to(tl.float32) + q.to(tl.float32) * tk_j.to(tl.float32), 1) * tau

    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + _causal_shift(Lq, Lk, BOTTOM_RIGHT))  # <= 0: no key
    loop_lo, loop_hi = _walk_range(0, hi, TileNum_base + start_m * stride_nt, HAS_BLOCKS)
    for it in range(loop_lo, loop_hi, 1 if HAS_BLOCKS else BLOCK_N):
        start_n, partial = _walk_tile(it, TileIdx_base + start_m * stride_it, BLOCK_N, HAS_BLOCKS)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kT_mask = (offs_d[:, None] < D) & n_ok[None, :]
        v_mask = n_ok[:, None] & (offs_dv[None, :] < DV)
        kT = tl.load(K_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=kT_mask, other=0.0)
        tkT = tl.load(TK_base + offs_n[None, :] * stride_tkn + offs_d[:, None], mask=kT_mask, other=0.0)
        v = tl.load(V_base + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=v_mask, other=0.0)
        tv = tl.load(TV_base + offs_n[:, None] * stride_tvn + offs_dv[None, :], mask=v_mask, other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            tkT = tkT.to(tl.float32)
            v = v.to(tl.float32)
            tv = tv.to(tl.float32)
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION) * tau
        valid = _valid_tile(offs_m[:, None], offs_n[None, :], Lq, Lk, IS_CAUSAL, BOTTOM_RIGHT)
        mask_ptrs = Mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        valid = _block_valid(valid, offs_m[:, None], offs_n[None, :], Blocks_base, stride_bm, stride_bn, block_q,
                             block_k, partial, BLOCK_KEYS)
        s, valid = _masked_scores(s, valid, mask_ptrs, HAS_MASK, MASK_IS_BOOL)
        p = tl.exp(s - m_safe[:, None])  # the same rounded s and m as pass 1
        l_i += tl.sum(p, 1)
        ds = tl.dot(tq, kT, input_precision=INPUT_PRECISION)
        ds = tl.dot(q, tkT, ds, input_precision=INPUT_PRECISION) * tau
        at_j = offs_n[None, :] == j[:, None]  # c becomes the dot's own ds at j in j's tile
        c_i = tl.where((j >= start_n) & (j < start_n + BLOCK_N), tl.sum(tl.where(at_j, ds, 0.0), 1), c_i)
        pds = tl.where(p != 0.0, p * (ds - c_i[:, None]), 0.0)  # p = 0 off the mask
        r_i += tl.sum(pds, 1)
        t_acc = tl.dot(p.to(tv.dtype), tv, t_acc, input_precision=INPUT_PRECISION)
        if PDS_FP32:  # fp16: p*ds can exceed 65504, keep that product in fp32
            t_acc = tl.dot(pds, v.to(tl.float32), t_acc, input_precision=INPUT_PRECISION)
        else:
            t_acc = tl.dot(pds.to(v.dtype), v, t_acc, input_precision=INPUT_PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o_mask = m_ok[:, None] & (offs_dv[None, :] < DV)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                mask=o_mask, other=0.0).to(tl.float32)
    to = (t_acc / l_safe[:, None] - (r_i / l_safe)[:, None] * o)
    to_off = off_b * stride_tob + off_h * stride_toh + offs_m[:, None] * stride_tom + offs_dv[None, :]
    tl.store(TO + to_off, to.to(TO.dtype.element_ty), mask=o_mask)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, Delta, stride_ob, stride_oh, stride_om,
                           stride_dob, stride_doh, stride_dom, H, Lq, DV,
                           BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, (B, H, Lq)."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    msk = (offs_m[:, None] < Lq) & (offs_dv[None, :] < DV)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=msk, other=0.0).to(tl.float32)
    tl.store(Delta + off_bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _load_lse(LSE, off, offs, L):
    """Row lse, with empty rows (-inf) turned to +inf so that exp(s - lse) = 0 there."""
    lse = tl.load(LSE + off + offs, mask=offs < L, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Mask, Blocks, TileNum, TileIdx, LSE, Delta, DK, DV_,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_nb, stride_nh, stride_nt, stride_ib, stride_ih, stride_it,
    block_q, block_k,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    H, GROUP, Lq, Lk, D, DV, tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_BLOCKS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, S_AS_FWD: tl.constexpr,
):
    """One key block of one key head: dK, dV summed over its GROUP query heads. S_AS_FWD (the
    interpreter) recomputes s^T in the forward's operand order (q K^T, then transposed)."""
    start_n = tl.program_id(0)
    off_bhk = tl.program_id(1)
    HK = H // GROUP
    off_b = (off_bhk // HK).to(tl.int64)
    off_hk = off_bhk % HK
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Lk
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (tl.maximum(start_n * BLOCK_N - _causal_shift(Lq, Lk, BOTTOM_RIGHT), 0) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        Mask_base = Mask + off_b * stride_mb + off_h * stride_mh
        Blocks_base = Blocks + off_b * stride_bb + off_h * stride_bh
        TileNum_base = TileNum + off_b * stride_nb + off_h * stride_nh
        TileIdx_base = TileIdx + off_b * stride_ib + off_h * stride_ih
        loop_lo, loop_hi = _walk_range(lo, Lq, TileNum_base + start_n * stride_nt, HAS_BLOCKS)
        for it in range(loop_lo, loop_hi, 1 if HAS_BLOCKS else BLOCK_M):
            start_m, partial = _walk_tile(it, TileIdx_base + start_n * stride_it, BLOCK_M, HAS_BLOCKS)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            qT = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[None, :] * stride_qm + offs_d[:, None],
                         mask=m_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                         mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            if UPCAST:
                qT = qT.to(tl.float32)
                do = do.to(tl.float32)
            lse = _load_lse(LSE, (off_b * H + off_h) * Lq, offs_m, Lq)
            delta = tl.load(Delta + (off_b * H + off_h) * Lq + offs_m, mask=m_ok, other=0.0)
            # p = exp(s - lse) needs s rounded as the forward rounded it: at logits ~1e9 one ulp is 64.
            # A tensor-core mma sums the d products of K Q^T in the order it sums those of Q K^T; numpy's
            # BLAS (the interpreter's dot) does not, so there the forward's order is kept. On the GPU
            # that transpose is a shared-memory round trip that spills (kernel_report: 8-48 B, NOTES.md).
            if S_AS_FWD:
                sT = tl.trans(tl.dot(tl.trans(qT), tl.trans(k), input_precision=INPUT_PRECISION)) * tau
            else:
                sT = tl.dot(k, qT, input_precision=INPUT_PRECISION) * tau  # (BLOCK_N, BLOCK_M)
            validT = _valid_tile(offs_m[None, :], offs_n[:, None], Lq, Lk, IS_CAUSAL, BOTTOM_RIGHT)
            mask_ptrs = Mask_base + offs_m[None, :] * stride_mm + offs_n[:, None] * stride_mn
            validT = _block_valid(validT, offs_m[None, :], offs_n[:, None], Blocks_base, stride_bm, stride_bn,
                                  block_q, block_k, partial, BLOCK_KEYS)
            sT, validT = _masked_scores(sT, validT, mask_ptrs, HAS_MASK, MASK_IS_BOOL)
            # p <= 1 exactly, so the exponent is clamped at 0: an s rounded above the forward's cannot
            # overflow (the select keeps s unfused)
            pT = tl.exp(tl.minimum(sT - lse[None, :], 0.0))
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=INPUT_PRECISION)
    dk_off = off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + dk_off, (dk * tau).to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D))
    dv_off = off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :]
    tl.store(DV_ + dv_off, dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Mask, Blocks, TileNum, TileIdx, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_dqb, stride_dqh, stride_dqm,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_nb, stride_nh, stride_nt, stride_ib, stride_ih, stride_it,
    block_q, block_k,
    H, GROUP, Lq, Lk, D, DV, tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_BLOCKS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One query block: dQ = tau sum_n ds K."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = off_bh % H
    off_hk = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = _load_lse(LSE, off_bh * Lq, offs_m, Lq)
    delta = tl.load(Delta + off_bh * Lq + offs_m, mask=m_ok, other=0.0)
    K_base = K + off_b * stride_kb + off_hk * stride_kh
    V_base = V + off_b * stride_vb + off_hk * stride_vh
    Mask_base = Mask + off_b * stride_mb + off_h * stride_mh
    Blocks_base = Blocks + off_b * stride_bb + off_h * stride_bh
    TileNum_base = TileNum + off_b * stride_nb + off_h * stride_nh
    TileIdx_base = TileIdx + off_b * stride_ib + off_h * stride_ih
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M + _causal_shift(Lq, Lk, BOTTOM_RIGHT))  # <= 0: no key
    loop_lo, loop_hi = _walk_range(0, hi, TileNum_base + start_m * stride_nt, HAS_BLOCKS)
    for it in range(loop_lo, loop_hi, 1 if HAS_BLOCKS else BLOCK_N):
        start_n, partial = _walk_tile(it, TileIdx_base + start_m * stride_it, BLOCK_N, HAS_BLOCKS)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        k = tl.load(K_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        vT = tl.load(V_base + offs_n[None, :] * stride_vn + offs_dv[:, None],
                     mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vT = vT.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * tau
        valid = _valid_tile(offs_m[:, None], offs_n[None, :], Lq, Lk, IS_CAUSAL, BOTTOM_RIGHT)
        mask_ptrs = Mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        valid = _block_valid(valid, offs_m[:, None], offs_n[None, :], Blocks_base, stride_bm, stride_bn, block_q,
                             block_k, partial, BLOCK_KEYS)
        s, valid = _masked_scores(s, valid, mask_ptrs, HAS_MASK, MASK_IS_BOOL)
        p = tl.exp(tl.minimum(s - lse[:, None], 0.0))  # p <= 1 (see the dk/dv kernel)
        dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    dq_off = off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    tl.store(DQ + dq_off, (dq * tau).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------
# Launchers: tile choice, validation of what the kernels assume, allocation, launch.
# Configs are (BLOCK_M, BLOCK_N, num_warps, num_stages); the first of each list is the default.
# BLOCK_M counts queries and BLOCK_N keys in every kernel.
# ---------------------------------------------------------------------------------------------
def _by_head_dim(small, medium, large):
    return lambda block_d: small if block_d <= 64 else medium if block_d <= 128 else large


# Chosen from benchmarks/kernel_report.py (heaviest variant: causal, fp32 additive mask; NOTES.md
# section 20): every config listed compiles with 0 spill bytes and tensor-core instructions for
# fp16 and bf16 on its target, except at head dim 256 (report: DOCUMENTED_SPILLS). A dict gives a list
# per target, 80 for sm_8x and 90 for sm_90 and later (device_arch); where the two differ it is the
# register file: sm_80's mma keeps both dot operands in registers, sm_90's wgmma reads them from
# shared memory.
CONFIGS = {
    "fwd": _by_head_dim([(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
                        [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 2)],
                        [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3)]),
    "fwd_jvp": _by_head_dim([(128, 64, 8, 2), (64, 32, 8, 3), (64, 64, 8, 3)], [], []),
    "jvp": _by_head_dim([], {80: [(128, 16, 8, 2), (128, 16, 8, 3)],  # 64 rows spill on sm_80 (NOTES.md 26)
                             90: [(128, 32, 8, 2), (128, 32, 8, 3), (128, 16, 8, 2), (64, 16, 8, 2)]},
                        {80: [(32, 32, 8, 2), (32, 16, 4, 2)],  # spill: kernel_report.DOCUMENTED_SPILLS
                         90: [(64, 16, 8, 2), (128, 16, 8, 2), (32, 32, 8, 2)]}),
    "bwd_dkdv": _by_head_dim({80: [(128, 32, 8, 2), (64, 32, 8, 2), (16, 128, 8, 1), (64, 32, 8, 3)],
                              90: [(64, 128, 8, 1), (32, 128, 8, 2), (64, 64, 8, 2), (16, 128, 8, 2)]},
                             {80: [(32, 64, 8, 2), (32, 64, 8, 1), (64, 32, 8, 2), (16, 64, 8, 2)],
                              90: [(32, 128, 8, 1), (32, 64, 8, 2), (16, 128, 8, 2), (64, 64, 8, 1)]},
                             [(32, 32, 8, 2), (64, 32, 8, 1)]),
    "bwd_dq": _by_head_dim([(128, 64, 8, 3), (128, 32, 8, 2), (128, 64, 8, 1), (64, 64, 4, 3)],
                           [(128, 32, 8, 2), (64, 64, 8, 2), (128, 16, 8, 2), (64, 32, 4, 2)],
                           [(64, 32, 8, 2), (64, 16, 8, 2), (32, 64, 8, 2)]),
}


def device_arch():
    """80 (the sm_80 lists: Ampere, Ada) or 90 (sm_90 lists: Hopper and later) for the current GPU."""
    if not torch.cuda.is_available():
        return 90
    return 80 if torch.cuda.get_device_capability()[0] < 9 else 90


def configs(kind, block_d, dtype, arch=None):
    """Tuning configs for `kind` on sm_`arch` (default: the current GPU's, device_arch()). fp32 tiles take
    twice the bytes: halve BLOCK_N and the stages (and BLOCK_M at head dims >= 128) so that they fit
    the shared memory of an A100 (163 KiB)."""
    listed = CONFIGS[kind](block_d)
    if isinstance(listed, dict):
        listed = listed[arch or device_arch()]
    if dtype != torch.float32:
        return listed
    return [(max(16, bm // 2) if block_d >= 128 else bm, max(16, bn // 2), warps, min(stages, 2))
            for bm, bn, warps, stages in listed]


def delta_block_m(block_dv):
    """Rows per program of the delta kernel: 4096 elements per tile (32 a thread at 4 warps)."""
    return max(16, 4096 // block_dv)


_best_config = {}


def head_blocks(d, dv):
    """Padded head-dim tiles: powers of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))


def _input_precision(dtype):
    if INTERPRET or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _run_tuned(kind, key, block_d, dtype, launch, blocks=None):
    """Launch with the fastest config for `key`, timing every config on the first call (GPU only).
    blocks (block_q, block_k) of a block mask: only the configs whose tiles divide the blocks, if any
    (no per-key check, which spills: NOTES.md section 26)."""
    if INTERPRET:
        return launch((INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, 4, 1))
    candidates = configs(kind, block_d, dtype)
    if blocks is not None:
        key = key + blocks
        candidates = [c for c in candidates if blocks[0] % c[0] == 0 and blocks[1] % c[1] == 0] or candidates
    if os.environ.get("SCM_FAST_AUTOTUNE", "1") == "0":
        return launch(candidates[0])
    cfg = _best_config.get((kind, key))
    if cfg is None:
        times = []
        for c in candidates:
            try:
                times.append(triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=25))
            except triton.runtime.errors.OutOfResources:
                times.append(math.inf)
        if min(times) == math.inf:
            raise RuntimeError(f"attention {kind}: no tile config fits this GPU ({candidates})")
        cfg = candidates[min(range(len(candidates)), key=times.__getitem__)]
        _best_config[(kind, key)] = cfg
    return launch(cfg)


def _strides3(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_args(mask, q):
    """(pointer, 4 strides, is_bool) for a mask already expanded to (B, Hq, Lq, Lk)."""
    if mask is None:
        return q, (0, 0, 0, 0), False
    if mask.stride(-1) != 1:  # unit stride over keys: contiguous mask loads (benchmarks/kernel_report.py)
        mask = mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
        return mask, mask.stride(), True
    return mask, mask.stride(), False


def _block_args(blocks, block_q, block_k, q, k, causal, shift):
    """(blocks, 4 strides, walk) for a block mask expanded to (B, Hq, nQ, nK). walk(bm, bn, by_key) gives a
    config's live tiles (attention_blocks.tile_lists, causal tiles removed) as kernel arguments: the
    counts, the entries, their 6 strides and BLOCK_KEYS, whether a tile can be partly live (blocks that
    are not multiples of the tile). For None, stand-ins the kernels never read."""
    if blocks is None:
        return q, (0, 0, 0, 0), lambda bm, bn, by_key=False: (q, q, (0,) * 6, False)
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    small = compact(blocks)

    def walk(bm, bn, by_key=False):
        states = tile_liveness(small, block_q, block_k, Lq, Lk, bm, bn)
        keep = causal_tiles(Lq, Lk, bm, bn, shift, small.device) if causal else None
        num, entries = tile_lists(states, keep, by_key)
        num, entries = num.expand(B, H, *num.shape[-1:]), entries.expand(B, H, *entries.shape[-2:])
        strides = (*num.stride(), *entries.stride()[:3])
        return num, entries, strides, block_q % bm != 0 or block_k % bn != 0

    blocks = blocks.view(torch.uint8)
    return blocks, blocks.stride(), walk


def _common(q, k, v, mask, blocks):
    B, H, Lq, D = q.shape
    Hk, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    block_d, block_dv = head_blocks(D, DV)
    flags = dict(HAS_MASK=mask is not None, HAS_BLOCKS=blocks is not None,
                 UPCAST=INTERPRET and q.dtype == torch.bfloat16,
                 INPUT_PRECISION=_input_precision(q.dtype), BLOCK_D=block_d, BLOCK_DV=block_dv)
    key = (q.dtype, D, DV, triton.next_power_of_2(Lq), triton.next_power_of_2(Lk), H // Hk, mask is not None,
           blocks is not None)
    return (B, H, Hk, Lq, Lk, D, DV), flags, key


def two_pass(block_d):
    """Forward + JVP in two passes (pass 1: o, lse, row max and its key; pass 2: to) at head-dim tiles
    above 64, where the one-pass kernel's two BLOCK_M x BLOCK_DV fp32 accumulators spill (NOTES.md 20)."""
    return block_d > 64


def _bottom_right(causal, shift, Lq, Lk):
    """The kernels' BOTTOM_RIGHT from the op's causal shift: 0 (top-left) or Lk - Lq (bottom-right)."""
    if causal and shift not in (0, Lk - Lq):
        raise ValueError(f"attention (triton): causal_shift must be 0 or Lk - Lq = {Lk - Lq}, got {shift}")
    return bool(causal) and shift != 0


def attention_fwd(q, k, v, mask, blocks, block_q, block_k, causal, shift, scale, tq=None, tk=None, tv=None):
    """(o, lse) or, with tangents, (o, lse, to). Shapes: q (B, Hq, Lq, D), k (B, Hk, Lk, D),
    v (B, Hk, Lk, Dv), mask None or expanded to (B, Hq, Lq, Lk), blocks None or a bool block mask
    expanded to (B, Hq, ceil(Lq / block_q), ceil(Lk / block_k)); lse is fp32 (B, Hq, Lq)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    (B, H, Hk, Lq, Lk, D, DV), flags, key = _common(q, k, v, mask, blocks)
    o = q.new_empty(B, H, Lq, DV)
    lse = q.new_empty(B, H, Lq, dtype=torch.float32)
    has_t = tq is not None
    if has_t:
        tq, tk, tv = _unit_last(tq), _unit_last(tk), _unit_last(tv)
        to = torch.empty_like(o)
    else:
        tq, tk, tv, to = q, k, v, o
    split = has_t and two_pass(flags["BLOCK_D"])
    row_max = torch.empty_like(lse) if split else lse
    arg_max = torch.empty(lse.shape, dtype=torch.int32, device=q.device) if split else lse
    mask_t, mask_strides, mask_bool = _mask_args(mask, q)
    blocks_t, block_strides, walk = _block_args(blocks, block_q, block_k, q, k, causal, shift)
    grid = lambda bm: (triton.cdiv(Lq, bm), B * H)  # noqa: E731
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(tq), *_strides3(tk), *_strides3(tv),
               *mask_strides)
    common = dict(MASK_IS_BOOL=mask_bool, IS_CAUSAL=causal, BOTTOM_RIGHT=_bottom_right(causal, shift, Lq, Lk),
                  PDS_FP32=q.dtype == torch.float16, **flags)

    def launch(cfg):
        bm, bn, warps, stages = cfg
        num, entries, walk_strides, block_keys = walk(bm, bn)
        _attn_fwd_kernel[grid(bm)](
            q, k, v, tq, tk, tv, mask_t, blocks_t, num, entries, o, to, lse, row_max, arg_max,
            *strides, *block_strides, *walk_strides, block_q, block_k, *_strides3(o), *_strides3(to),
            H, H // Hk, Lq, Lk, D, DV, scale,
            BLOCK_M=bm, BLOCK_N=bn, HAS_TANGENT=has_t and not split, STORE_MAX=split, BLOCK_KEYS=block_keys,
            num_warps=warps, num_stages=stages, **common)

    def launch_jvp(cfg):
        bm, bn, warps, stages = cfg
        num, entries, walk_strides, block_keys = walk(bm, bn)
        _attn_jvp_kernel[grid(bm)](
            q, k, v, tq, tk, tv, mask_t, blocks_t, num, entries, o, row_max, arg_max, to,
            *strides, *block_strides, *walk_strides, block_q, block_k, *_strides3(o), *_strides3(to),
            H, H // Hk, Lq, Lk, D, DV, scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_KEYS=block_keys, num_warps=warps, num_stages=stages, **common)

    kind = "fwd_jvp" if has_t and not split else "fwd"
    sizes = None if blocks is None else (block_q, block_k)
    _run_tuned(kind, key + (causal, split), flags["BLOCK_D"], q.dtype, launch, sizes)
    if split:
        _run_tuned("jvp", key + (causal,), flags["BLOCK_D"], q.dtype, launch_jvp, sizes)
    return (o, lse, to) if has_t else (o, lse)


def attention_bwd(do, q, k, v, o, lse, mask, blocks, block_q, block_k, causal, shift, scale):
    """(dq, dk, dv) of the primal output, from the forward's o and lse."""
    q, k, v, o, do = (_unit_last(x) for x in (q, k, v, o, do))
    (B, H, Hk, Lq, Lk, D, DV), flags, key = _common(q, k, v, mask, blocks)
    group = H // Hk
    delta = torch.empty_like(lse)
    bm = delta_block_m(flags["BLOCK_DV"])
    _attn_bwd_delta_kernel[(triton.cdiv(Lq, bm), B * H)](
        o, do, delta, *_strides3(o), *_strides3(do), H, Lq, DV, BLOCK_M=bm, BLOCK_DV=flags["BLOCK_DV"])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask_t, mask_strides, mask_bool = _mask_args(mask, q)
    blocks_t, block_strides, walk = _block_args(blocks, block_q, block_k, q, k, causal, shift)
    common = dict(MASK_IS_BOOL=mask_bool, IS_CAUSAL=causal, BOTTOM_RIGHT=_bottom_right(causal, shift, Lq, Lk),
                  **flags)

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        num, entries, walk_strides, block_keys = walk(bm, bn, by_key=True)
        _attn_bwd_dkdv_kernel[(triton.cdiv(Lk, bn), B * Hk)](
            q, k, v, do, mask_t, blocks_t, num, entries, lse, delta, dk, dv,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *mask_strides,
            *block_strides, *walk_strides, block_q, block_k,
            *_strides3(dk), *_strides3(dv), H, group, Lq, Lk, D, DV, scale,
            BLOCK_M=bm, BLOCK_N=bn, S_AS_FWD=INTERPRET, BLOCK_KEYS=block_keys, num_warps=warps,
            num_stages=stages, **common)

    def launch_dq(cfg):
        bm, bn, warps, stages = cfg
        num, entries, walk_strides, block_keys = walk(bm, bn)
        _attn_bwd_dq_kernel[(triton.cdiv(Lq, bm), B * H)](
            q, k, v, do, mask_t, blocks_t, num, entries, lse, delta, dq,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *mask_strides, *_strides3(dq),
            *block_strides, *walk_strides, block_q, block_k,
            H, group, Lq, Lk, D, DV, scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_KEYS=block_keys, num_warps=warps, num_stages=stages, **common)

    sizes = None if blocks is None else (block_q, block_k)
    _run_tuned("bwd_dkdv", key + (causal,), flags["BLOCK_D"], q.dtype, launch_dkdv, sizes)
    _run_tuned("bwd_dq", key + (causal,), flags["BLOCK_D"], q.dtype, launch_dq, sizes)
    return dq, dk, dv
