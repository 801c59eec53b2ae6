"""The linear patch_sdpa installs (scm_fast/interop/linear.py): inside constant_tangents (sCM's one
pass) a linear's tangent has no autograd graph; the step's gradients are those of the two-pass step."""
from pathlib import Path

import pytest
import torch

import tiny_diffusers as td
from scm_fast import objectives, patch_sdpa
from scm_fast.interop import linear
from scm_fast.models import diffusers_net
from scm_fast.ops import constant_tangents

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_tangent_graph_only_outside_constant_tangents():
    layer = torch.nn.Linear(8, 4)
    x, tx = torch.randn(3, 8), torch.randn(3, 8)
    with patch_sdpa():
        y, ty = torch.func.jvp(layer, (x,), (tx,))
        assert ty.grad_fn is not None  # PyTorch's rule: tx W^T recorded for dW
        with constant_tangents():
            y2, ty2 = torch.func.jvp(layer, (x,), (tx,))
    assert ty2.grad_fn is None and y2.grad_fn is not None
    torch.testing.assert_close(ty2, ty)
    torch.testing.assert_close(y2, y)


def test_one_pass_diffusers_gradients_equal_two_pass(tmp_path, monkeypatch):
    """scm_loss on a tiny SD3 through DiffusersNet: the one pass (graphless linears) and the two-pass
    step give the same parameter gradients."""
    calls = []
    real = linear.under_autocast
    monkeypatch.setattr(linear, "under_autocast", lambda *a: calls.append(1) or real(*a))
    folder = td.save_pipeline_folder("sd3", Path(tmp_path) / "sd3")
    grads = []
    for one_pass in (True, False):
        net = diffusers_net.load_pretrained(diffusers_net.build(diffusers_net.read_spec(folder)), folder)
        cfg = objectives.SCMConfig(one_pass=one_pass, tangent_warmup=0)
        x0, cond = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2)), td.cond("sd3", 3)
        loss, _ = objectives.scm_loss(net, x0, 10, cfg, cond, generator=torch.Generator().manual_seed(3))
        loss.backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
        assert (len(calls) > 0) == one_pass  # only the one pass takes the graphless linear
        calls.clear()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)
