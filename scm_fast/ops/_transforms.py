"""Which derivatives the fused ops give: first order, and second order through the tangent; any other
second-order use raises an error, never zeros.

The kernels give an output and its first derivatives: the backward (reverse mode) and the tangent
(forward mode, in the same pass). sCM's one pass is exactly that: a forward under torch.func.jvp,
then the backward of the primal once the jvp has returned. A derivative of a derivative would need
the kernels' own derivatives, which nothing computes: autograd would give zeros (on the reference
backend, a partial sum) without a word. Each such use raises a RuntimeError naming the op and the
transform instead:
  double backward  a backward that records a graph (autograd.grad(..., create_graph=True) and then a
                   gradient of that, gradgradcheck, torch.autograd.functional.hvp), or
                   torch.func.grad of torch.func.grad
  jvp of grad      a backward run inside the forward-AD level whose tangents passed through the op:
                   torch.func.jvp(torch.func.grad(f)) (a Hessian-vector product), forward_ad over a
                   backward
  jvp of jvp       tangents from two nested torch.func.jvp levels
A double backward raises when the gradient is differentiated (a backward with create_graph=True
alone is fine: torch.func.vjp's vjp_fn records one); a jvp of grad raises in the backward, whose
tangents forward AD computes at once (a backward inside a dual level whose tangents went through the
op raises even if the gradient's tangent is never read: run that backward after the jvp).
Allowed: torch.func.grad (or a backward) of a function that calls torch.func.jvp (or forward_ad,
or attention_jvp). The primal output's gradient is the fused backward. The output TANGENT is
differentiable too (reverse mode through the JVP output: Terminal Velocity Matching, MeanFlow
variants), by autograd through the op's reference, recomputed in that backward
(differentiable_tangent: O(reference) memory, differentiable again, so a double backward through the
tangent works); sCM detaches its tangent (sg(.)) and never runs that backward.
For the other second-order derivatives use the math references, attention_ref and
adaptive_double_norm_ref: plain PyTorch ops, which autograd differentiates to any order.

functorch runs an autograd.Function's setup_context once per transform level, each with its own ctx
but the same non-tensor arguments: a `Uses` passed as one is how a jvp at one level and a backward at
another see each other.
"""
import contextlib
import threading

import torch
import torch.autograd.forward_ad as fwAD
from torch._C import _functions, _functorch

REFERENCES = {"attention": "attention_ref", "adaptive_double_norm": "adaptive_double_norm_ref"}
DOUBLE_BACKWARD = "double backward (grad of grad: a backward with create_graph=True, or torch.func.grad of torch.func.grad)"
JVP_OF_GRAD = "forward-mode AD over backward (jvp of grad, e.g. a Hessian-vector product)"
JVP_OF_JVP = "jvp of jvp (tangents from two nested torch.func.jvp levels)"
RUN_OUTSIDE = "; for first derivatives run the backward after torch.func.jvp returns (outside forward_ad.dual_level)"


class Uses:
    """One call of a fused op, shared by the ctx of every transform level: the op's name and how many
    levels took its jvp."""

    __slots__ = ("op", "jvps")

    def __init__(self, op):
        self.op, self.jvps = op, 0


def unsupported(op, transform, hint=""):
    return RuntimeError(f"scm_fast.ops.{op}: {transform} is not supported; the fused kernels give first derivatives "
                        f"only{hint}. For second-order derivatives use scm_fast.ops.{REFERENCES[op]} (plain PyTorch "
                        f"ops, which autograd differentiates to any order)")


def _interpreters():
    """The torch.func transforms active now, outermost first ([] outside any)."""
    return [] if _functorch.peek_interpreter_stack() is None else _functorch.get_interpreter_stack()


def _levels(kind):
    return {i.level() for i in _interpreters() if i.key() == kind}


def _grad_levels_tracking(tensors):
    """The torch.func.grad levels at which any of `tensors` requires grad."""
    grads, found = _levels(_functorch.TransformType.Grad), set()
    for x in tensors:
        while grads and isinstance(x, torch.Tensor) and _functorch.is_functorch_wrapped_tensor(x):
            level = _functorch.maybe_get_level(x)
            if level in grads and _functorch.is_gradtrackingtensor(x) and x.requires_grad:
                found.add(level)
            x = _functorch.get_unwrapped(x)
    return found


_state = threading.local()


@contextlib.contextmanager
def constant_tangents():
    """Inside: the fused ops' output tangents carry no graph, for a caller that detaches its tangent
    (sCM's sg(dF/dt), MeanFlow's target): nothing is saved for a backward through the tangent that
    never runs (tq, tk, tv of every attention call would be kept until the tangent is freed)."""
    before = getattr(_state, "constant", False)
    _state.constant = True
    try:
        yield
    finally:
        _state.constant = before


def has_tangent(*xs):
    """Whether any of xs (None allowed) carries a forward-AD tangent (torch.func.jvp or forward_ad)."""
    return any(x is not None and fwAD.unpack_dual(x).tangent is not None for x in xs)


def zeros_for_none(xs, ts):
    """ts with each None replaced by zeros like the matching x (a jvp rule's absent tangents)."""
    return tuple(torch.zeros_like(x) if t is None else t for x, t in zip(xs, ts))


def tangents_are_constant():
    """Inside constant_tangents."""
    return getattr(_state, "constant", False)


def may_need_grad(tensors):
    """Whether a reverse pass may differentiate a result of `tensors`: grad mode on, outside
    constant_tangents, and one of them (or the tensor under its torch.func wrappers) requires grad,
    or a torch.func.grad level is open."""
    if not torch.is_grad_enabled() or tangents_are_constant():
        return False
    return any(_unwrapped(x).requires_grad for x in tensors) or bool(_levels(_functorch.TransformType.Grad))


def _unwrapped(x):
    """The plain tensor under torch.func wrappers (a wrapper reports requires_grad=False)."""
    while _functorch.is_functorch_wrapped_tensor(x):
        x = _functorch.get_unwrapped(x)
    return x


def check_call(op, tensors):
    """At the public API, before the autograd.Function: torch.func.grad of torch.func.grad."""
    if len(_grad_levels_tracking(tensors)) > 1:
        raise unsupported(op, DOUBLE_BACKWARD)


def check_jvp(uses, tangents):
    """In the autograd.Function's jvp: a second level with tangents is a jvp of a jvp."""
    if all(t is None for t in tangents):
        return
    uses.jvps += 1
    if uses.jvps > 1:
        raise unsupported(uses.op, JVP_OF_JVP)


def _forward_ad_through_backward(uses, grad_out):
    if fwAD._current_level < 0:  # no dual level open (sCM: the backward after the jvp)
        return False
    if uses.jvps or fwAD.unpack_dual(grad_out).tangent is not None:
        return True
    return bool(_levels(_functorch.TransformType.Jvp))  # under torch.func.jvp the tangents are not visible here


def check_backward(uses, grad_out):
    """In the autograd.Function's backward, before the kernel (which runs under torch.no_grad)."""
    if _forward_ad_through_backward(uses, grad_out):
        raise unsupported(uses.op, JVP_OF_GRAD, RUN_OUTSIDE)


def first_order(uses, grads, links):
    """The backward's `grads`; when the backward records a graph (create_graph=True), passed through a
    node that raises if a gradient of them is taken. Its inputs include `links` (grad_out and the saved
    inputs, which the gradients depend on) that require grad, so that every second derivative reaches
    it. Under torch.func transforms check_call and check_backward do this (torch.func.grad records too)."""
    if not torch.is_grad_enabled() or _interpreters():
        return grads
    links = [t for t in links if isinstance(t, torch.Tensor) and t.requires_grad]
    if not links:
        return grads
    present = [g for g in grads if g is not None]
    error = _functions.DelayedError(str(unsupported(uses.op, DOUBLE_BACKWARD)), len(present) + len(links))
    guarded = iter(error(*present, *links)[:len(present)])
    return tuple(None if g is None else next(guarded) for g in grads)


# ---- second order through the tangent --------------------------------------------------------
def differentiable_tangent(tangent, reference, inputs):
    """A fused op's output tangent, made differentiable when a reverse pass may need it (torch.func.grad
    of a loss on the tangent: Terminal Velocity Matching, MeanFlow variants): the gradient then reaches
    `inputs` (the op's inputs and their tangents; None for an absent one) instead of stopping silently.
    reference(*inputs) recomputes the tangent with plain PyTorch ops (the op's reference), which the
    backward differentiates: O(reference) memory for that one backward, and any order above it."""
    if not may_need_grad([x for x in inputs if x is not None]):
        return tangent
    return _TangentVJP.apply(tangent, reference, *inputs)


class _TangentVJP(torch.autograd.Function):
    """Identity on the fused tangent; backward: the vector-Jacobian product of reference(*inputs)."""

    @staticmethod
    def forward(tangent, reference, *inputs):
        return tangent.view_as(tangent)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.reference, *args = inputs
        ctx.present = [i for i, x in enumerate(args) if x is not None]
        ctx.n = len(args)
        ctx.save_for_backward(*(args[i] for i in ctx.present))

    @staticmethod
    def backward(ctx, grad):
        def tangent_of(*present):
            args = [None] * ctx.n
            for i, x in zip(ctx.present, present):
                args[i] = x
            return ctx.reference(*args)

        _, vjp = torch.func.vjp(tangent_of, *ctx.saved_tensors)
        grads = [None] * ctx.n
        for i, g in zip(ctx.present, vjp(grad)):
            grads[i] = g
        return None, None, *grads
