"""The networks' embeddings of scalars and their conditioning embedding (scm-reference.md §5).

positional: the sinusoidal embedding of c_noise(t) = t [P §4.1]; ScalarEmbedding: positional ->
2-layer MLP in fp32 with autocast off [rCM]; ConditionEmbedding: the base class of the DiT and the
U-Net that builds and sums emb = time(t) + label(labels) + guidance(s) + time_r(r).
"""
import math

import torch

from scm_fast.nn import Linear, SiLU
from scm_fast.precision import accumulation_dtype

__all__ = ["ConditionEmbedding", "ScalarEmbedding", "positional"]


def positional(x, dim, max_period=10000.0):
    """Sinusoidal embedding of a (B,) scalar: [cos(x f_i), sin(x f_i)], f_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    dtype = accumulation_dtype(x)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=dtype) / half)
    args = x.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedding(torch.nn.Module):
    """positional(x) -> Linear -> SiLU -> Linear with autocast off: in the dtype of its weights, which
    trainers keep in fp32 [rCM]."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = torch.nn.Sequential(Linear(freq_dim, dim), SiLU(), Linear(dim, dim))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.mlp(positional(x, self.freq_dim).to(self.mlp[0].weight.dtype))


class ConditionEmbedding(torch.nn.Module):
    """Base class of the networks F_theta(x_in, t, labels, guidance, r): their conditioning embedding
    emb = time(t) + label(labels) + guidance(s) + time_r(r), each term a ScalarEmbedding (c_noise(t) = t)
    or, for labels, an nn.Embedding with one extra row for the CFG null class (labels == -1 or
    num_classes). Missing inputs default to s = 1 and r = t.

    A base class rather than a submodule: `init_embedding` puts the embedders on the network itself,
    so the state-dict keys stay time.*, label.*, guidance.*, time_r.* (absent parts are None), and
    calling it where the network used to build them keeps the order of the random draws.
    act=True (the U-Net) adds emb_act, a SiLU applied to the sum with autocast off. strict=True (the
    U-Net) checks that t is (B,) and labels integer (B,) and casts the label embedding to the dtype
    of time(t); without it (the DiT) the sum follows PyTorch's type promotion.
    """

    def init_embedding(self, dim, num_classes=0, guidance_embed=False, second_time=False, *, act=False,
                       strict=False):
        self._emb_null, self._emb_strict = num_classes, strict
        self.time = ScalarEmbedding(dim)
        self.label = torch.nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.guidance = ScalarEmbedding(dim) if guidance_embed else None
        self.time_r = ScalarEmbedding(dim) if second_time else None
        if act:
            self.emb_act = SiLU()

    def start_as_unguided(self):
        """Zero the guidance embedder's output layer, so that a student initialised from an unguided
        teacher starts as the teacher for every s [P §5.1]."""
        if self.guidance is not None:
            torch.nn.init.zeros_(self.guidance.mlp[2].weight)
            torch.nn.init.zeros_(self.guidance.mlp[2].bias)

    def repeated_blocks(self):
        """The network's repeated blocks (FSDP2 units, activation-checkpointing units); networks override it."""
        return []

    def embed(self, t, labels=None, guidance=None, r=None):
        """Conditioning embedding (B, dim) in the embedders' dtype (fp32), autocast off inside them."""
        name = type(self).__name__
        if self._emb_strict and t.dim() != 1:
            raise ValueError(f"t must be (B,), got shape {tuple(t.shape)}")
        emb = self.time(t)
        if self.label is not None:
            if labels is None:
                raise ValueError(f"this {name} is class-conditional: pass labels (B,) (-1 for the null class)")
            if self._emb_strict and (labels.shape != t.shape or labels.is_floating_point()):
                raise ValueError(f"labels must be integer (B,) = {tuple(t.shape)}, got {tuple(labels.shape)} "
                                 f"{labels.dtype}")
            null = self._emb_null
            label = self.label(torch.where(labels < 0, torch.full_like(labels, null), labels))
            emb = emb + (label.to(emb.dtype) if self._emb_strict else label)
        if self.guidance is not None:
            emb = emb + self.guidance(guidance if guidance is not None else torch.ones_like(t))
        if self.time_r is not None:
            emb = emb + self.time_r(r if r is not None else t)
        act = self._modules.get("emb_act")
        if act is None:
            return emb
        with torch.autocast(t.device.type, enabled=False):
            return act(emb)
