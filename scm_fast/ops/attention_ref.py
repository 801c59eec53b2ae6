"""Pure-PyTorch attention: the math reference and the key-chunked CPU fallback kernels.

`attention_ref` is the definition every kernel is tested against: plain softmax attention, which
autograd and forward AD differentiate by themselves (O(Lq x Lk) memory; use it in fp64 for tests).

`attention_fwd_reference`, `attention_fwd_jvp_reference` and `attention_bwd_reference` compute what the
fused kernels compute (scm-reference.md §7) with torch ops over key chunks and an online softmax, so
memory stays O(Lq x chunk). They back the CPU op when no compiled kernel applies. Like the kernels,
the tangent sums are shifted by ds at the running max (csrc/attention.cpp: exact `to` at large scales).

A key the mask excludes is -inf in the scores whatever q k^T is (NaN or inf included), so a row that
sees no key gives 0 output and 0 tangent even when its q (or a masked k) is NaN.
Shapes: q (B, Hq, Lq, D); k (B, Hk, Lk, D); v (B, Hk, Lk, Dv); Hq = G Hk (GQA); mask None or
expanded to (B, Hq, Lq, Lk), bool (True = attend) or additive; blocks None or a bool block mask
expanded to (B, Hq, ceil(Lq / block_q), ceil(Lk / block_k)) (attention_blocks): the passes run on
tiles of whole blocks and skip those that meet no live block in any head.
"""
from typing import NamedTuple, Optional

import torch

from scm_fast.ops.attention_blocks import compact, tile_liveness
from scm_fast.precision import accumulation_dtype

CHUNK = 512
BLOCK_TILE = 128  # with a block mask: tiles of about this many queries and keys, whole blocks each


def _apply_mask(s, mask):
    """s + the mask's bias, exactly -inf where the mask excludes a key (even where s is NaN)."""
    if mask is None:
        return s
    if mask.dtype == torch.bool:
        return s.masked_fill(~mask, float("-inf"))
    bias = mask.to(s.dtype)
    return (s + bias).masked_fill(torch.isneginf(bias), float("-inf"))


def causal_shift(causal, lq, lk):
    """(is causal, shift): key j visible to query i iff j <= i + shift. causal True / "top_left" is
    SDPA's is_causal (shift 0); "bottom_right" aligns the last query with the last key (shift
    Lk - Lq: flash-attn and KV-cache code), so with Lq > Lk the first Lq - Lk queries see no key."""
    if causal in (False, None):
        return False, 0
    return True, (lk - lq if causal == "bottom_right" else 0)


def attention_ref(q, k, v, attn_mask=None, causal=False, scale=None):
    """softmax(scale q k^T + mask) v, with rows that see no key set to 0 (SDPA would give NaN).
    causal: False, True or "top_left" (SDPA's is_causal), or "bottom_right" (causal_shift)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = _apply_mask(scale * (q @ k.transpose(-1, -2)), attn_mask)
    is_causal, shift = causal_shift(causal, q.shape[-2], k.shape[-2])
    if is_causal:
        lq, lk = s.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(shift)
        s = s.masked_fill(~keep, float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return p @ v


def _tile(block):
    """Rows or keys per tile with a block mask: whole blocks, about BLOCK_TILE."""
    return block * -(-BLOCK_TILE // block)


def _head_states(blocks, block_q, block_k, lq, lk):
    """[[state]] per (row tile, key tile) over every head at once (the passes run all heads together):
    0 dead in every head, 2 live in every block of every head, 1 otherwise (attention_blocks.tile_liveness)."""
    states = tile_liveness(compact(blocks), block_q, block_k, lq, lk, _tile(block_q), _tile(block_k)).flatten(0, 1)
    dead, live = (states == 0).all(0), (states == 2).all(0)
    return torch.where(dead, 0, torch.where(live, 2, 1)).tolist()


class _Visible(NamedTuple):
    """What hides a key from a query, in the grouped layout (B, Hk, G, ...), for the query rows
    [row0, row0 + n) a pass sees."""
    mask: Optional[torch.Tensor]    # (B, Hk, G, n, Lk): those rows
    blocks: Optional[torch.Tensor]  # (B, Hk, G, nQ, nK): every block row
    block_q: int
    block_k: int
    causal: bool
    shift: int
    states: Optional[list] = None   # _head_states
    row0: int = 0

    def row_chunks(self, lq):
        """Query row ranges a pass runs on: all rows, or row tiles of whole query blocks."""
        if self.blocks is None or lq == 0:
            return [(0, lq)]
        step = _tile(self.block_q)
        return [(r, min(r + step, lq)) for r in range(0, lq, step)]

    def rows(self, start, stop):
        return self._replace(mask=None if self.mask is None else self.mask[..., start:stop, :], row0=start)

    def key_tiles(self, lk):
        """(start, stop, state) of the key chunks these rows attend: CHUNK keys at a time, or the key
        tiles of whole blocks that are not dead (state 2: every block live, no key check)."""
        if self.blocks is None:
            return [(start, min(start + CHUNK, lk), 2) for start in range(0, lk, CHUNK)]
        step = _tile(self.block_k)
        row = self.states[self.row0 // _tile(self.block_q)]
        return [(start, min(start + step, lk), row[start // step]) for start in range(0, lk, step)
                if row[start // step]]


def _grouped(q, k, v, mask, blocks=None):
    """Views that put the G query heads of one key head on their own axis: (B, Hk, G, L, D)."""
    B, H, Lq, D = q.shape
    Hk = k.shape[1]
    q5 = q.view(B, Hk, H // Hk, Lq, D)
    m5 = None if mask is None else mask.view(B, Hk, H // Hk, Lq, mask.shape[-1])
    b5 = None if blocks is None else blocks.reshape(B, Hk, H // Hk, *blocks.shape[-2:])
    return q5, k.unsqueeze(2), v.unsqueeze(2), m5, b5


def _chunk_scores(q5, k5, vis, scale, start, stop, state=1):
    """Scores (B, Hk, G, Lq, n) of keys [start, stop), masked positions at -inf (state 2: every block live)."""
    s = _apply_mask(scale * (q5 @ k5[..., start:stop, :].transpose(-1, -2)),
                    None if vis.mask is None else vis.mask[..., start:stop])
    rows = torch.arange(vis.row0, vis.row0 + q5.shape[-2], device=s.device)
    cols = torch.arange(start, stop, device=s.device)
    if vis.blocks is not None and state == 1:  # key j of row i: blocks[i // block_q, j // block_k]
        keep = vis.blocks[..., rows // vis.block_q, :][..., cols // vis.block_k]
        s = s.masked_fill(~keep, float("-inf"))
    if vis.causal:
        s = s.masked_fill(cols[None, :] > rows[:, None] + vis.shift, float("-inf"))
    return s


def _online_pass(q5, k5, v5, vis, scale, tangents=None):
    """Online softmax over key chunks; returns (o, lse) and, with tangents, to."""
    acc_dtype = accumulation_dtype(q5)
    q5, k5, v5 = q5.to(acc_dtype), k5.to(acc_dtype), v5.to(acc_dtype)
    shape = q5.shape[:-1]
    m_i = torch.full(shape, float("-inf"), dtype=acc_dtype, device=q5.device)
    l_i = torch.zeros(shape, dtype=acc_dtype, device=q5.device)
    acc = torch.zeros(*shape, v5.shape[-1], dtype=acc_dtype, device=q5.device)
    if tangents is not None:
        tq5, tk5, tv5 = (t.to(acc_dtype) for t in tangents)
        t_acc, r_i, c_i = torch.zeros_like(acc), torch.zeros_like(l_i), torch.zeros_like(l_i)
    for start, stop, state in vis.key_tiles(k5.shape[-2]):
        s = _chunk_scores(q5, k5, vis, scale, start, stop, state)
        chunk_max = s.amax(-1)
        m_new = torch.maximum(m_i, chunk_max)
        m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m_i - m_safe)
        v_c = v5[..., start:stop, :]
        l_old, acc = l_i * alpha, acc * alpha[..., None]
        l_i = l_old + p.sum(-1)
        if tangents is not None:
            k_c, tk_c, tv_c = k5[..., start:stop, :], tk5[..., start:stop, :], tv5[..., start:stop, :]
            ds = scale * (tq5 @ k_c.transpose(-1, -2) + q5 @ tk_c.transpose(-1, -2))
            at_max = ds.gather(-1, s.argmax(-1, keepdim=True)).squeeze(-1)
            c_new = torch.where(chunk_max > m_i, at_max, c_i)  # ds at the running max (module docstring)
            dc = c_new - c_i
            pds = (p * (ds - c_new[..., None])).masked_fill(p == 0, 0.0)
            r_i = r_i * alpha - dc * l_old + pds.sum(-1)
            t_acc = t_acc * alpha[..., None] - dc[..., None] * acc + p @ tv_c + pds @ v_c
            c_i = c_new
        acc = acc + p @ v_c
        m_i = m_new
    l_safe = torch.where(l_i > 0, l_i, torch.ones_like(l_i))
    o = acc / l_safe[..., None]
    lse = torch.where(l_i > 0, m_i + torch.log(l_safe), torch.full_like(l_i, float("-inf")))
    if tangents is None:
        return o, lse
    return o, lse, (t_acc - r_i[..., None] * o) / l_safe[..., None]


def _flat(x, like):
    """(B, Hk, G, L, D) -> (B, Hq, L, D) in like's dtype (sizes spelled out: B or L may be 0)."""
    return x.reshape(like.shape[0], like.shape[1], *x.shape[-2:]).to(like.dtype)


def _lse(lse, q):
    """(B, Hk, G, Lq) -> (B, Hq, Lq); fp32 (fp64 for fp64 inputs)."""
    return lse.reshape(q.shape[:-1]).to(accumulation_dtype(q))


def _visible(q, k, v, mask, blocks, block_q, block_k, causal, shift):
    q5, k5, v5, m5, b5 = _grouped(q, k, v, mask, blocks)
    states = None if blocks is None else _head_states(blocks, block_q, block_k, q.shape[2], k.shape[2])
    return q5, k5, v5, _Visible(m5, b5, block_q, block_k, causal, shift, states)


def _by_rows(vis, fn, rows_of, lq):
    """fn(rows of each tensor, vis for them) over vis.row_chunks: (o, lse[, to]) concatenated along the
    rows (dim -2 of o and to, -1 of lse)."""
    parts = [fn(*(x[..., r0:r1, :] for x in rows_of), vis.rows(r0, r1)) for r0, r1 in vis.row_chunks(lq)]
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(xs, dim=-1 if i == 1 else -2) for i, xs in enumerate(zip(*parts)))


def attention_fwd_reference(q, k, v, mask, blocks, block_q, block_k, causal, shift, scale):
    q5, k5, v5, vis = _visible(q, k, v, mask, blocks, block_q, block_k, causal, shift)
    o, lse = _by_rows(vis, lambda q5, vis: _online_pass(q5, k5, v5, vis, scale), (q5,), q.shape[2])
    return _flat(o, q), _lse(lse, q)


def attention_fwd_jvp_reference(q, k, v, tq, tk, tv, mask, blocks, block_q, block_k, causal, shift, scale):
    q5, k5, v5, vis = _visible(q, k, v, mask, blocks, block_q, block_k, causal, shift)
    tq5, tk5, tv5, _, _ = _grouped(tq, tk, tv, None)
    o, lse, to = _by_rows(vis, lambda q5, tq5, vis: _online_pass(q5, k5, v5, vis, scale, (tq5, tk5, tv5)),
                          (q5, tq5), q.shape[2])
    return _flat(o, q), _lse(lse, q), _flat(to, q)


def _bwd_rows(q5, k5, v5, do5, o5, lse5, vis, scale):
    """dq of these query rows and their share of dk, dv, over the live key chunks."""
    delta = (do5 * o5).sum(-1, keepdim=True)
    dq = torch.zeros_like(q5)
    dk, dv = torch.zeros_like(k5.squeeze(2)), torch.zeros_like(v5.squeeze(2))
    for start, stop, state in vis.key_tiles(k5.shape[-2]):
        p = torch.exp(_chunk_scores(q5, k5, vis, scale, start, stop, state) - lse5[..., None])
        dv[..., start:stop, :] = (p.transpose(-1, -2) @ do5).sum(2)
        ds = p * (do5 @ v5[..., start:stop, :].transpose(-1, -2) - delta)
        dq += scale * (ds @ k5[..., start:stop, :])
        dk[..., start:stop, :] = scale * (ds.transpose(-1, -2) @ q5).sum(2)
    return dq, dk, dv


def attention_bwd_reference(grad_out, q, k, v, out, lse, mask, blocks, block_q, block_k, causal, shift, scale):
    """FlashAttention-2 backward over key chunks: p = exp(s - lse), ds = p (dp - delta)."""
    acc_dtype = accumulation_dtype(q)
    q5, k5, v5, vis = _visible(*(x.to(acc_dtype) for x in (q, k, v)), mask, blocks, block_q, block_k, causal,
                               shift)
    do5 = grad_out.to(acc_dtype).view(q5.shape[:-1] + (grad_out.shape[-1],))
    o5 = out.to(acc_dtype).view_as(do5)
    lse5 = lse.to(acc_dtype).view(q5.shape[:-1])
    lse5 = lse5.masked_fill(torch.isneginf(lse5), float("inf"))  # empty rows: p = 0
    dqs, dk, dv = [], 0, 0
    for r0, r1 in vis.row_chunks(q.shape[2]):  # dk, dv: the sum over the row chunks
        rows = slice(r0, r1)
        dq_r, dk_r, dv_r = _bwd_rows(q5[..., rows, :], k5, v5, do5[..., rows, :], o5[..., rows, :], lse5[..., rows],
                                     vis.rows(r0, r1), scale)
        dqs.append(dq_r)
        dk, dv = dk + dk_r, dv + dv_r
    return _flat(torch.cat(dqs, dim=-2), q), dk.to(k.dtype), dv.to(v.dtype)
