"""patch_sdpa routes flex_attention (with or without a BlockMask) to the block-sparse fused attention:
torch.func.jvp runs through it (flex_attention itself has no forward-mode rule), through diffusers'
"flex" attention backend and a tiny diffusers model using it; what the op cannot express falls back."""
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.attention.flex_attention as flex
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import scm_fast
import scm_fast.interop.flex_attention as route
from scm_fast.ops import attention_ref
from tolerance import assert_rule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tiny_diffusers  # noqa: E402

BUILTIN = flex.flex_attention


def _window(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < 24)


def inputs(B=2, H=2, L=70, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g) for _ in range(6)]


@pytest.fixture
def fused_calls(monkeypatch):
    """The calls that reach the fused op through the flex route."""
    calls = []
    real = route.attention
    monkeypatch.setattr(route, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


def reference(primals, tangents, dense, dtype):
    return torch.func.jvp(lambda q, k, v: attention_ref(q, k, v, attn_mask=dense),
                          tuple(x.to(dtype) for x in primals), tuple(t.to(dtype) for t in tangents))


def test_jvp_through_flex_attention_with_a_block_mask(fused_calls):
    q, k, v, tq, tk, tv = inputs()
    block_mask = create_block_mask(_window, None, None, 70, 70, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(RuntimeError):  # PyTorch's flex_attention has no forward-mode rule (dynamo: Unsupported)
        torch.func.jvp(lambda q, k, v: flex.flex_attention(q, k, v, block_mask=block_mask), (q, k, v), (tq, tk, tv))
    with scm_fast.patch_sdpa():
        assert flex.flex_attention is route.PATCHED
        o, to = torch.func.jvp(lambda q, k, v: flex.flex_attention(q, k, v, block_mask=block_mask, scale=0.3),
                               (q, k, v), (tq, tk, tv))
    assert flex.flex_attention is BUILTIN and len(fused_calls) == 1
    dense = create_mask(_window, None, None, 70, 70, device="cpu")
    exact = torch.func.jvp(lambda q, k, v: attention_ref(q, k, v, attn_mask=dense, scale=0.3),
                           *[tuple(x.double() for x in xs) for xs in ((q, k, v), (tq, tk, tv))])
    low = torch.func.jvp(lambda q, k, v: attention_ref(q, k, v, attn_mask=dense, scale=0.3), (q, k, v), (tq, tk, tv))
    assert_rule("o", o, low[0], exact[0], torch.float32)
    assert_rule("to", to, low[1], exact[1], torch.float32)


def test_diffusers_flex_backend_dispatches_a_block_mask(fused_calls):
    """diffusers' dispatch_attention_fn(backend="flex") with a BlockMask, (B, L, H, D) layout."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    q, k, v, tq, tk, tv = (x.transpose(1, 2) for x in inputs())
    block_mask = create_block_mask(_window, 2, None, 70, 70, device="cpu", BLOCK_SIZE=32)
    with scm_fast.patch_sdpa():
        o, to = torch.func.jvp(lambda q, k, v: dispatch_attention_fn(q, k, v, attn_mask=block_mask, backend="flex"),
                               (q, k, v), (tq, tk, tv))
    assert len(fused_calls) == 1
    dense = create_mask(_window, None, None, 70, 70, device="cpu")
    primals, tangents = [tuple(x.transpose(1, 2) for x in xs) for xs in ((q, k, v), (tq, tk, tv))]
    exact, low = reference(primals, tangents, dense, torch.float64), reference(primals, tangents, dense, torch.float32)
    assert_rule("o", o.transpose(1, 2), low[0], exact[0], torch.float32)
    assert_rule("to", to.transpose(1, 2), low[1], exact[1], torch.float32)


def test_a_diffusers_model_on_the_flex_backend_runs_under_jvp(fused_calls):
    """A tiny Wan transformer on diffusers' flex backend: the same output and tangent as on its default
    (SDPA) backend, both through patch_sdpa."""
    from diffusers.models.attention_dispatch import attention_backend
    torch.manual_seed(0)
    model = tiny_diffusers.wan().eval()
    x = torch.randn(1, 4, 2, 8, 8)
    t = torch.full((1,), 500.0)
    cond = tiny_diffusers.cond("wan", 1)
    tx = torch.randn_like(x)

    def run():
        with scm_fast.patch_sdpa():
            return torch.func.jvp(lambda x: model(x, t, **cond, return_dict=False)[0], (x,), (tx,))

    o_sdpa, to_sdpa = run()
    assert not fused_calls
    # the context manager, not model.set_attention_backend, which also sets diffusers' process-wide default
    with attention_backend("flex"):
        o_flex, to_flex = run()
    assert len(fused_calls) >= 2  # self- and cross-attention of each block
    torch.testing.assert_close(o_flex, o_sdpa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(to_flex, to_sdpa, atol=1e-5, rtol=1e-5)


def test_score_mod_and_lse_fall_back_with_one_warning(fused_calls):
    q, k, v = inputs()[:3]
    with scm_fast.patch_sdpa(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = flex.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + 0.1 * (i - j))
        flex.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s)
        out_lse, lse = flex.flex_attention(q, k, v, return_lse=True)
    assert not fused_calls
    ours = [str(w.message) for w in seen if "scm_fast.patch_sdpa" in str(w.message)]
    assert len(ours) == 2 and "score_mod" in ours[0] and "return_lse" in ours[1], ours
    bias = 0.1 * (torch.arange(70)[:, None] - torch.arange(70)[None, :]).float()
    torch.testing.assert_close(out, attention_ref(q, k, v, attn_mask=bias), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(out_lse, attention_ref(q, k, v), atol=2e-6, rtol=2e-6)


def test_jvp_only_leaves_calls_without_tangents_to_pytorch(fused_calls):
    q, k, v, tq, tk, tv = inputs()
    with scm_fast.patch_sdpa(jvp_only=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex.flex_attention(q, k, v)
        assert not fused_calls
        torch.func.jvp(lambda q: flex.flex_attention(q, k, v), (q,), (tq,))
    assert len(fused_calls) == 1
