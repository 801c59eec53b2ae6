"""torch.nn.functional.linear without a tangent graph in sCM's one pass, installed by `patch_sdpa`.

Under torch.func.jvp with weights that require grad, PyTorch's forward-AD rule for linear records
tx W^T for autograd: the one pass then keeps every linear's input tangent until backward, although
sCM's tangent is a stop-gradient (NOTES.md §22: a diffusers SD3 step held more memory fused than in
two passes). Inside scm_fast.ops.constant_tangents (scm_loss's one pass, which detaches its tangent)
a call whose input, weight or bias carries a tangent goes through scm_fast.nn's linear, whose tangent
has exact values and no graph; every other call is PyTorch's.
"""
import torch

from scm_fast.nn import _LinearFn, under_autocast
from scm_fast.ops import _transforms

BUILTIN = torch.nn.functional.linear


def linear(input, weight, bias=None):
    """torch.nn.functional.linear; in constant_tangents with a tangent: scm_fast.nn's (module docstring)."""
    if _transforms.tangents_are_constant() and _transforms.has_tangent(input, weight, bias):
        return under_autocast(_LinearFn.apply, input, weight, bias)
    return BUILTIN(input, weight, bias)
