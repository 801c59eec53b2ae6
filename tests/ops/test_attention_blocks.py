"""Block-sparse attention (scm_fast.ops.attention_blocks) against the fp64 reference with the same
pattern as a dense element mask: torch.func.jvp, forward_ad and backward on every backend; dead tiles
are never read; flex_attention BlockMasks and mask_mods; the tile states; bad input."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from scm_fast.ops import BlockSparse, attention, attention_jvp, attention_ref
from scm_fast.ops.attention_blocks import causal_tiles, element_blocks, tile_liveness, tile_lists
from test_attention import BLOCK, make, make_mask, ref_jvp_and_grad
from tolerance import assert_rule

# (B, Hq, Hk, Lq, Lk, D, Dv, causal, mask, block_q, block_k): sizes 1, primes, block + 1, head dims
# 72/80/96 (96: the Triton two-pass forward + JVP), GQA, blocks that do not divide L or the tiles
CASES = [
    (1, 1, 1, 1, 1, 16, 16, False, None, 16, 16),
    (2, 4, 2, 150, 203, 32, 24, False, None, 48, 40),
    (1, 2, 1, BLOCK + 1, 2 * BLOCK + 1, 96, 96, True, "bool", 64, 64),
    (1, 2, 2, 97, 131, 72, 72, "bottom_right", "additive", 17, 33),
    (2, 2, 1, 61, 300, 80, 80, False, "keypad", 128, 128),
]
IDS = [f"B{c[0]}H{c[1]}/{c[2]}L{c[3]}x{c[4]}D{c[5]}-{c[7]}-{c[8]}-blk{c[9]}x{c[10]}" for c in CASES]


def make_blocks(B, H, Lq, Lk, bq, bk, density=0.4, seed=4):
    """Random blocks (B, H or 1, nQ, nK) with, where there are two query blocks, one that sees nothing
    in head 0 and one that sees every key (fully masked rows, fully live tiles)."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    blocks = torch.rand(B, H, nq, nk, generator=g) < density
    if nq > 1:
        blocks[:, 0, 0] = False
        blocks[:, :, -1] = True
    return blocks


def run_case(case, dtype, device):
    B, H, Hk, Lq, Lk, D, Dv, causal, mask_kind, bq, bk = case
    q, k, v, tq, tk, tv = make((B, H, Lq, D), (B, Hk, Lk, D), Dv, dtype, device)
    mask = make_mask(mask_kind, B, H, Lq, Lk, device)
    blocks = make_blocks(B, H, Lq, Lk, bq, bk).to(device)
    return (q, k, v), (tq, tk, tv), mask, causal, BlockSparse(blocks, bq, bk)


def dense_equivalent(mask, block_mask, Lq, Lk):
    """The element mask that selects what attn_mask=mask, block_mask=block_mask does."""
    keep = element_blocks(block_mask.blocks, block_mask.block_q, block_mask.block_k, Lq, Lk)
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, float("-inf"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jvp_and_backward_match_the_dense_mask(case, device_backend):
    device, _ = device_backend
    primals, tangents, mask, causal, block_mask = run_case(case, torch.float32, device)
    primals = tuple(x.detach().requires_grad_() for x in primals)
    o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v, attn_mask=mask, causal=causal, block_mask=block_mask),
                           primals, tangents)
    grad_out = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(o)
    o.backward(grad_out)
    dense = dense_equivalent(mask, block_mask, case[3], case[4])
    exact = ref_jvp_and_grad(primals, tangents, dense, causal, grad_out, torch.float64)
    low = ref_jvp_and_grad(primals, tangents, dense, causal, grad_out, torch.float32)
    for name, a, lo, ex in zip(("o", "to", "dq", "dk", "dv"), (o, to, *(x.grad for x in primals)), low, exact):
        assert_rule(name, a, lo, ex, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype, device_backend):
    device, _ = device_backend
    primals, tangents, mask, causal, block_mask = run_case(CASES[3], dtype, device)
    o, to = attention_jvp(*primals, *tangents, attn_mask=mask, causal=causal, block_mask=block_mask)
    dense = dense_equivalent(mask, block_mask, CASES[3][3], CASES[3][4])
    zeros = torch.zeros(o.shape)
    exact = ref_jvp_and_grad(primals, tangents, dense, causal, zeros, torch.float64)
    low = ref_jvp_and_grad(primals, tangents, dense, causal, zeros, dtype)
    assert_rule("o", o, low[0], exact[0], dtype)
    assert_rule("to", to, low[1], exact[1], dtype)


def test_forward_ad(device_backend):
    device, _ = device_backend
    primals, tangents, mask, causal, block_mask = run_case(CASES[2], torch.float32, device)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(primals, tangents)]
        out = fwAD.unpack_dual(attention(*duals, attn_mask=mask, causal=causal, block_mask=block_mask))
    dense = dense_equivalent(mask, block_mask, CASES[2][3], CASES[2][4])
    zeros = torch.zeros(out.primal.shape)
    exact = ref_jvp_and_grad(primals, tangents, dense, causal, zeros, torch.float64)
    low = ref_jvp_and_grad(primals, tangents, dense, causal, zeros, torch.float32)
    assert_rule("o", out.primal, low[0], exact[0], torch.float32)
    assert_rule("to", out.tangent, low[1], exact[1], torch.float32)


def test_dead_tiles_are_never_read(device_backend):
    """Keys 512..1023 (whole tiles of every backend: the reference's 128, the kernels' 64 and 128) lie in dead
    blocks for every query: NaN there in k, v and their tangents cannot reach any output or gradient,
    which it would if the tiles were computed and masked (p = 0 times NaN). Against the reference on
    the keys that remain."""
    device, _ = device_backend
    B, H, Lq, Lk, D, bk = 1, 2, 70, 1100, 16, 64
    q, k, v, tq, tk, tv = make((B, H, Lq, D), (B, H, Lk, D), D, torch.float32, device)
    blocks = torch.ones(1, 1, 1, -(-Lk // bk), dtype=torch.bool)
    blocks[..., 512 // bk:1024 // bk] = False
    for x in (k, v, tk, tv):
        x[:, :, 512:1024] = float("nan")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v, block_mask=BlockSparse(blocks.to(device), 128, bk)),
                           (q, k, v), (tq, tk, tv))
    o.sum().backward()
    assert all(torch.isfinite(x).all() for x in (o, to, q.grad))
    assert torch.isfinite(k.grad[:, :, :512]).all() and torch.isfinite(k.grad[:, :, 1024:]).all()
    keep = torch.cat([torch.arange(512), torch.arange(1024, Lk)])
    kept = [x.detach()[:, :, keep].double() for x in (k, v, tk, tv)]
    ro, rto = torch.func.jvp(attention_ref, (q.detach().double(), kept[0], kept[1]), (tq.double(), kept[2], kept[3]))
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(to.double(), rto, atol=1e-5, rtol=1e-5)


def test_second_order_through_the_block_mask():
    """The gradient of the output tangent goes through the reference with the same blocks."""
    primals, tangents, mask, causal, block_mask = run_case(CASES[1], torch.float64, "cpu")
    dense = dense_equivalent(mask, block_mask, CASES[1][3], CASES[1][4])
    got = torch.func.grad(lambda *xs: attention_jvp(*xs, block_mask=block_mask)[1].square().sum(),
                          argnums=(0, 1, 2, 3, 4, 5))(*primals, *tangents)
    want = torch.func.grad(lambda q, k, v, tq, tk, tv: torch.func.jvp(
        lambda a, b, c: attention_ref(a, b, c, attn_mask=dense), (q, k, v), (tq, tk, tv))[1].square().sum(),
        argnums=(0, 1, 2, 3, 4, 5))(*primals, *tangents)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _sliding_causal(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < 40)


@pytest.mark.parametrize("heads", [None, 2], ids=["broadcast", "per-head"])
def test_flex_block_mask_equals_flex_attention(heads, device_backend):
    """A flex_attention BlockMask (partial blocks: its mask_mod; full blocks: every key) gives
    flex_attention's output; under jvp the tangent of the equivalent dense mask."""
    device, _ = device_backend
    B, H, L, D = 2, 2, 100, 16
    q, k, v, tq, tk, tv = make((B, H, L, D), (B, H, L, D), D, torch.float32, device)
    block_mask = create_block_mask(_sliding_causal, None, heads, L, L, device=device, BLOCK_SIZE=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention's own "not compiled" notice
        want = flex_attention(q, k, v, block_mask=block_mask)
    o, to = torch.func.jvp(lambda q, k, v: attention(q, k, v, block_mask=block_mask), (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(o, want, atol=2e-6, rtol=2e-6)
    dense = create_mask(_sliding_causal, None, None, L, L, device=device)
    exact = ref_jvp_and_grad((q, k, v), (tq, tk, tv), dense, False, torch.zeros(o.shape), torch.float64)
    low = ref_jvp_and_grad((q, k, v), (tq, tk, tv), dense, False, torch.zeros(o.shape), torch.float32)
    assert_rule("to", to, low[1], exact[1], torch.float32)


def test_flex_full_blocks_attend_every_key_and_partial_ones_ask_the_mask_mod():
    """flex_attention's kernel semantics (what its compiled path does): keys in a full block all attend,
    keys in a partial block where the mask_mod says so, others none; for a BlockMask whose blocks
    disagree with its mask_mod (from_kv_blocks). (Eager flex_attention evaluates the mask_mod alone.)"""
    from torch.nn.attention.flex_attention import BlockMask
    L, bs = 64, 16
    partial_idx = torch.arange(4, dtype=torch.int32).view(1, 1, 4, 1).expand(1, 1, 4, 4).contiguous()  # diagonal
    full_idx = torch.zeros(1, 1, 4, 4, dtype=torch.int32)  # key block 0, for query block 3 only
    block_mask = BlockMask.from_kv_blocks(
        torch.ones(1, 1, 4, dtype=torch.int32), partial_idx, torch.tensor([[[0, 0, 0, 1]]], dtype=torch.int32),
        full_idx, BLOCK_SIZE=bs, mask_mod=lambda b, h, q, k: (q + k) % 3 == 0, seq_lengths=(L, L))
    rows, cols = torch.arange(L)[:, None], torch.arange(L)[None, :]
    dense = ((rows // bs == cols // bs) & ((rows + cols) % 3 == 0)) | ((rows // bs == 3) & (cols // bs == 0))
    q, k, v = make((1, 2, L, 8), (1, 2, L, 8), 8, torch.float32, "cpu")[:3]
    torch.testing.assert_close(attention(q, k, v, block_mask=block_mask), attention_ref(q, k, v, dense),
                               atol=2e-6, rtol=2e-6)


def test_a_block_mask_is_converted_once_while_it_lives(monkeypatch):
    """The layers of a model share one BlockMask: its mask_mod is evaluated on the first call only."""
    import torch.nn.attention.flex_attention as flex
    calls = []
    real = flex.create_mask
    monkeypatch.setattr(flex, "create_mask", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make((1, 2, 100, 8), (1, 2, 100, 8), 8, torch.float32, "cpu")[:3]
    block_mask, other = (create_block_mask(_sliding_causal, None, None, 100, 100, device="cpu", BLOCK_SIZE=32)
                         for _ in range(2))
    calls.clear()  # create_block_mask evaluates it too
    first = attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(attention(q, k, v, block_mask=block_mask), first, rtol=0, atol=0)
    assert len(calls) == 1
    attention(q, k, v, block_mask=other)
    assert len(calls) == 2


def test_mask_mod_is_a_block_mask_too():
    B, H, L, D = 1, 2, 150, 16
    q, k, v = make((B, H, L, D), (B, H, L, D), D, torch.float32, "cpu")[:3]
    dense = create_mask(_sliding_causal, None, None, L, L)
    torch.testing.assert_close(attention(q, k, v, block_mask=_sliding_causal), attention_ref(q, k, v, dense),
                               atol=2e-6, rtol=2e-6)


def test_from_mask_keeps_every_block_the_mask_touches():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1, 45, 70, generator=g) > 0.97
    bs = BlockSparse.from_mask(mask, 16, 32)
    assert bs.blocks.shape == (2, 1, 3, 3)
    for i in range(3):
        for j in range(3):
            assert bs.blocks[..., i, j].tolist() == \
                mask[..., 16 * i:16 * (i + 1), 32 * j:32 * (j + 1)].flatten(-2).any(-1).tolist()
    q, k, v = make((2, 1, 45, 8), (2, 1, 70, 8), 8, torch.float32, "cpu")[:3]
    torch.testing.assert_close(attention(q, k, v, attn_mask=mask, block_mask=bs), attention_ref(q, k, v, mask),
                               atol=2e-6, rtol=2e-6)
    flat = mask[0, 0]  # (Lq, Lk), as attn_mask takes it: blocks (1, 1, nQ, nK)
    assert BlockSparse.from_mask(flat, 16, 32).blocks.shape == (1, 1, 3, 3)
    q, k, v = make((2, 4, 45, 8), (2, 2, 70, 8), 8, torch.float32, "cpu")[:3]
    torch.testing.assert_close(attention(q, k, v, attn_mask=flat, block_mask=BlockSparse.from_mask(flat, 16, 32)),
                               attention_ref(q, k, v, flat), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("tile", [(64, 64), (16, 128), (128, 16), (100, 30)])
def test_tile_states_against_the_element_mask(tile):
    """0 where a tile meets no live block, 2 where every element is live, 1 otherwise (checked element-wise)."""
    Lq, Lk, bq, bk = 150, 203, 24, 40
    blocks = make_blocks(2, 3, Lq, Lk, bq, bk)
    states = tile_liveness(blocks, bq, bk, Lq, Lk, *tile)
    element = element_blocks(blocks, bq, bk, Lq, Lk)
    tm, tn = tile
    assert states.shape == (2, 3, -(-Lq // tm), -(-Lk // tn)) and states.dtype == torch.int8
    for i in range(states.shape[2]):
        for j in range(states.shape[3]):
            part = element[..., i * tm:(i + 1) * tm, j * tn:(j + 1) * tn].flatten(-2)
            want = part.any(-1).to(torch.int8) + part.all(-1).to(torch.int8)
            assert torch.equal(states[..., i, j], want), (i, j)


@pytest.mark.parametrize("by_key", [False, True], ids=["by-query", "by-key"])
def test_tile_lists_walk_the_live_tiles_in_order(by_key):
    """The Triton kernels' walk: per tile row (per key tile with by_key) its live tiles, ascending, each
    flagged when only partly live; causal tiles (bottom-right, Lq < Lk) removed."""
    Lq, Lk, tm, tn, shift = 150, 203, 32, 16, 203 - 150
    states = tile_liveness(make_blocks(2, 3, Lq, Lk, 24, 40), 24, 40, Lq, Lk, tm, tn)
    keep = causal_tiles(Lq, Lk, tm, tn, shift)
    rows, cols = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    visible = (cols <= rows + shift)
    for i in range(keep.shape[0]):
        for j in range(keep.shape[1]):
            assert keep[i, j] == visible[i * tm:(i + 1) * tm, j * tn:(j + 1) * tn].any()
    num, entries = tile_lists(states, keep, by_key)
    want = torch.where(keep, states, 0)
    want = want.transpose(-1, -2) if by_key else want
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in want.shape[:-1])).tolist():
        row = want[tuple(idx)]
        live = torch.nonzero(row).flatten()
        n = num[tuple(idx)].item()
        assert n == len(live)
        assert entries[tuple(idx)][:n].tolist() == (2 * live + (row[live] == 1)).tolist()


def test_bad_block_masks_name_what_was_expected():
    q, k, v = make((1, 2, 50, 8), (1, 2, 70, 8), 8, torch.float32, "cpu")[:3]
    good = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"block_mask.blocks of shape \(1, 1, 4, 4\) must be .* = \(1, 2, 4, 5\)"):
        attention(q, k, v, block_mask=BlockSparse(good[..., :4], 16, 16))
    with pytest.raises(TypeError, match="block_mask.blocks must be a bool tensor, got torch.float32"):
        attention(q, k, v, block_mask=BlockSparse(good.float(), 16, 16))
    with pytest.raises(ValueError, match="block_mask.block_k must be a positive int, got 0"):
        attention(q, k, v, block_mask=BlockSparse(good, 16, 0))
    with pytest.raises(TypeError, match="block_mask must be a scm_fast.ops.BlockSparse, a flex_attention BlockMask "
                                        "or a mask_mod, got Tensor"):
        attention(q, k, v, block_mask=good)
    other = create_block_mask(_sliding_causal, None, None, 64, 70, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match=r"block_mask: the BlockMask is for \(Lq, Lk\) = \(64, 70\), the call's is "
                                         r"\(50, 70\)"):
        attention(q, k, v, block_mask=other)
    with pytest.raises(ValueError, match=r"block_mask: evaluating the mask_mod\(b, h, q_idx, kv_idx\) -> bool tensor "
                                         r"over \(1, 2, 50, 70\) failed"):
        attention(q, k, v, block_mask=lambda b, h, q_idx: q_idx > 0)
    with pytest.raises(ValueError, match=r"BlockSparse.from_mask: mask must be \(Lq, Lk\), .* got shape \(70,\)"):
        BlockSparse.from_mask(torch.ones(70, dtype=torch.bool))


def test_gpu_autotune_prefers_tiles_that_divide_the_blocks(monkeypatch):
    """On a GPU (here: the launcher's config choice with the interpreter switched off) a block mask
    restricts the candidates to configs whose tiles divide its blocks, so no tile is partly live and
    the kernels skip the per-key check (benchmarks/NOTES.md section 26); none fits: every config."""
    from scm_fast.kernels import attention as aj
    monkeypatch.setattr(aj, "INTERPRET", False)
    monkeypatch.setenv("SCM_FAST_AUTOTUNE", "0")  # the first candidate, no timing
    chosen = []
    for blocks in [(64, 64), (128, 32), None, (17, 33)]:
        aj._run_tuned("fwd", ("test", blocks), 64, torch.float16, chosen.append, blocks)
    everything = aj.configs("fwd", 64, torch.float16)
    assert [c[:2] for c in chosen] == [(64, 64), (128, 32), everything[0][:2], everything[0][:2]]
