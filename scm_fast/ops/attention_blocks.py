"""Block-sparse attention: which tiles of the score matrix hold any visible key.

A block mask splits the (Lq, Lk) score matrix of each (batch, head) into blocks of block_q queries x
block_k keys and says which blocks attend. The fused attention skips every tile that meets no live
block (no q K^T, no exp, no products: forward, forward + JVP and backward, on every backend), so at
density rho it does about rho of the dense work. Element (i, j) is visible iff
    blocks[b, h, i // block_q, j // block_k]  and  attn_mask[b, h, i, j]  and  (causal: j <= i + shift).
Three ways to give one (`scm_fast.ops.attention(..., block_mask=...)`):
  BlockSparse(blocks, block_q, block_k)   blocks: bool (B or 1, H or 1, ceil(Lq / block_q), ceil(Lk / block_k));
                                          BlockSparse.from_mask(mask) builds it from an element mask
  a torch flex_attention BlockMask        its blocks: full ones attend every key, partial ones where its
                                          mask_mod allows (flex_attention's compiled semantics)
  a mask_mod(b, h, q_idx, kv_idx)         as flex_attention's create_block_mask, 128 x 128 blocks (evaluated
                                          on every call: build the BlockMask once where a model reuses it)
A BlockMask or mask_mod whose mask_mod is not noop_mask is also evaluated element by element (torch's
create_mask): a bool (B or 1, H or 1, Lq, Lk) tensor, Lq x Lk bytes per (batch, head) it names, once
per BlockMask while it lives (a model's layers share one; a mask_mod that reads tensors changed in place
later needs a new BlockMask). A mask_mod that depends on b or h needs a BlockMask built with B and H,
as for flex_attention. A BlockSparse costs only its blocks.
"""
import numbers
import weakref
from typing import NamedTuple

import torch

DEFAULT_BLOCK = 128  # flex_attention's default sparse block size


class BlockSparse(NamedTuple):
    """Which (query block, key block) tiles attend: blocks[b, h, i // block_q, j // block_k]."""
    blocks: torch.Tensor
    block_q: int = DEFAULT_BLOCK
    block_k: int = DEFAULT_BLOCK

    @classmethod
    def from_mask(cls, mask, block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK):
        """The blocks of a bool element mask (Lq, Lk) to (B, H, Lq, Lk), True = attend: a block attends iff
        any of its elements does. The mask's own pattern inside a block still needs attn_mask=mask."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"BlockSparse.from_mask: mask must be a bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if not 2 <= mask.dim() <= 4:
            raise ValueError(f"BlockSparse.from_mask: mask must be (Lq, Lk), (H, Lq, Lk) or (B, H, Lq, Lk), got shape "
                             f"{tuple(mask.shape)}")
        _check_block_size("BlockSparse.from_mask", block_q, block_k)
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        lq, lk = mask.shape[-2:]
        nq, nk = -(-lq // block_q), -(-lk // block_k)
        padded = mask.new_zeros(*mask.shape[:-2], nq * block_q, nk * block_k)
        padded[..., :lq, :lk] = mask
        blocks = padded.view(*mask.shape[:-2], nq, block_q, nk, block_k).any(-1).any(-2)
        return cls(blocks, block_q, block_k)

    def density(self):
        """The fraction of blocks that attend."""
        return self.blocks.float().mean().item() if self.blocks.numel() else 0.0


def positive_int(size):
    """True for a positive integer (a Python or numpy integer), not a bool."""
    return isinstance(size, numbers.Integral) and not isinstance(size, bool) and size >= 1


def _check_block_size(where, block_q, block_k):
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not positive_int(size):
            raise ValueError(f"{where}: {name} must be a positive int, got {size!r}")


def is_flex_block_mask(x):
    """True for a torch.nn.attention.flex_attention.BlockMask (imported only when one could exist)."""
    if type(x).__name__ != "BlockMask":
        return False
    from torch.nn.attention.flex_attention import BlockMask
    return isinstance(x, BlockMask)


def _dense_blocks(num_blocks, indices, n_kv):
    """(B, H, nQ, n_kv) bool from flex's compressed rows: the first num_blocks[b, h, i] of indices[b, h, i]."""
    used = torch.arange(indices.shape[-1], device=indices.device) < num_blocks[..., None]
    dense = torch.zeros(*indices.shape[:-1], max(n_kv, 1) + 1, dtype=torch.int32, device=indices.device)
    target = torch.where(used, indices.long().clamp(0, n_kv), n_kv)  # unused entries land in the spare column
    dense.scatter_add_(-1, target, torch.ones_like(target, dtype=torch.int32))
    return dense[..., :n_kv] > 0


_converted = weakref.WeakKeyDictionary()  # BlockMask -> from_flex's result, while the BlockMask lives


def from_flex(block_mask):
    """(BlockSparse, element mask or None) that select what flex_attention(block_mask=block_mask) attends:
    its full and partial blocks, and inside partial blocks its mask_mod (None where it has no partial
    block or its mask_mod is noop_mask). Computed once per BlockMask (the layers of a model share one)."""
    if block_mask not in _converted:
        _converted[block_mask] = _convert_flex(block_mask)
    return _converted[block_mask]


def _convert_flex(block_mask):
    from torch.nn.attention.flex_attention import create_mask, noop_mask
    bq, bk = block_mask.BLOCK_SIZE
    lq, lk = block_mask.seq_lengths
    n_kv = -(-lk // bk)
    partial = _dense_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, n_kv)
    full = None
    if block_mask.full_kv_num_blocks is not None:
        full = _dense_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_kv)
    blocks = partial if full is None else partial | full
    blocks = blocks[..., :-(-lq // bq), :]
    keep = None
    if block_mask.mask_mod is not noop_mask and bool(partial.any()):
        B, H = block_mask.kv_num_blocks.shape[:2]
        keep = create_mask(block_mask.mask_mod, B, H, lq, lk, device=blocks.device)
        if full is not None:  # flex skips mask_mod in full blocks
            keep = keep | element_blocks(full, bq, bk, lq, lk)
    return BlockSparse(blocks, int(bq), int(bk)), keep


def from_mask_mod(mask_mod, B, H, lq, lk, device, block_size=DEFAULT_BLOCK):
    """from_flex of flex_attention.create_block_mask(mask_mod, B, H, lq, lk, device, block_size): evaluated
    on every call (B x H x lq x lk elements); a model that reuses a mask builds the BlockMask once."""
    from torch.nn.attention.flex_attention import create_block_mask
    try:
        block_mask = create_block_mask(mask_mod, B, H, lq, lk, device=device, BLOCK_SIZE=block_size)
    except Exception as e:  # noqa: BLE001 - torch's own message, with what was being evaluated
        raise ValueError(f"block_mask: evaluating the mask_mod(b, h, q_idx, kv_idx) -> bool tensor over "
                         f"({B}, {H}, {lq}, {lk}) failed: {type(e).__name__}: {e}") from e
    return from_flex(block_mask)


def element_blocks(blocks, bq, bk, lq, lk):
    """blocks (..., nQ, nK) at element level (..., lq, lk): O(lq x lk), for tests and mask_mods."""
    rows = torch.arange(lq, device=blocks.device) // bq
    cols = torch.arange(lk, device=blocks.device) // bk
    return blocks[..., rows, :][..., cols]


def compact(blocks):
    """The blocks without their broadcast (zero-stride) batch and head dims: (B or 1, H or 1, nQ, nK)."""
    for dim in (0, 1):
        if blocks.shape[dim] > 1 and blocks.stride(dim) == 0:
            blocks = blocks.narrow(dim, 0, 1)
    return blocks


def tile_liveness(blocks, bq, bk, lq, lk, tile_m, tile_n):
    """Per tile of tile_m queries x tile_n keys: 0 (meets no live block: skipped), 1 (some live blocks:
    keys checked against the blocks), 2 (every block it meets is live: no check). int8
    (B', H', ceil(lq / tile_m), ceil(lk / tile_n)) for blocks (B', H', nQ, nK), by a 2-D prefix sum."""
    nq, nk = blocks.shape[-2:]
    dtype = torch.int32 if nq * nk < 2 ** 31 else torch.int64
    counts = torch.zeros(*blocks.shape[:-2], nq + 1, nk + 1, dtype=dtype, device=blocks.device)
    counts[..., 1:, 1:] = blocks.to(dtype).cumsum(-2).cumsum(-1)

    def spans(length, tile, block):  # blocks [lo, hi) met by each tile
        starts = torch.arange(0, max(length, 1), tile, device=blocks.device)
        return starts // block, (torch.clamp(starts + tile, max=length) + block - 1) // block

    r0, r1 = spans(lq, tile_m, bq)
    c0, c1 = spans(lk, tile_n, bk)
    live = (counts[..., r1[:, None], c1[None, :]] - counts[..., r0[:, None], c1[None, :]]
            - counts[..., r1[:, None], c0[None, :]] + counts[..., r0[:, None], c0[None, :]])
    area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    return ((live > 0).to(torch.int8) + ((live == area) & (area > 0)).to(torch.int8))


def causal_tiles(lq, lk, tile_m, tile_n, shift, device=None):
    """bool (ceil(lq / tile_m), ceil(lk / tile_n)): whether a tile holds any key j <= i + shift (causal)."""
    rows = torch.arange(0, max(lq, 1), tile_m, device=device)
    cols = torch.arange(0, max(lk, 1), tile_n, device=device)
    last_row = torch.clamp(rows + tile_m, max=lq) - 1
    return cols[None, :] <= last_row[:, None] + shift


def tile_lists(states, keep=None, by_key=False):
    """The live tiles of each tile row, for kernels that walk only those (flex_attention's kv_num_blocks /
    kv_indices): (num (..., nA) int32, entries (..., nA, nB) int32) with entries[..., a, :num[..., a]] =
    2 x tile + (1 if the tile is only partly live), ascending. states as tile_liveness gives them (query
    tiles x key tiles); keep (bool, broadcast) removes tiles as well (causal_tiles); by_key: per key tile,
    its query tiles (the dK/dV kernel's walk)."""
    if keep is not None:
        states = torch.where(keep, states, torch.zeros((), dtype=states.dtype, device=states.device))
    if by_key:
        states = states.transpose(-1, -2)
    live = states > 0
    order = torch.sort((~live).to(torch.int8), dim=-1, stable=True).indices  # live tiles first, ascending
    entries = 2 * order + (states.gather(-1, order) == 1)
    return live.sum(-1, dtype=torch.int32), entries.to(torch.int32).contiguous()
