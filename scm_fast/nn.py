"""Modules built on scm_fast's fused ops, and layers whose tangents carry no autograd graph.

Under torch.func.jvp with parameters that require grad, PyTorch's forward-AD formulas record the
tangent's computation for backward too (e.g. tx @ W^T saves tx for dW), although sCM's tangent is
a stop-gradient. In the one-pass step that roughly doubles the activations kept for backward.
Linear, GELU, SiLU and RMSNorm here compute their tangent from detached tensors instead (exact
values, no graph), as the fused attention and norm kernels do, and save detached tensors for
backward (autograd keeps the tangent of a saved dual tensor alive until backward). Their primal
output and gradients are PyTorch's.
"""
import torch
import torch.nn.functional as F

from scm_fast.ops.adaptive_norm import adaptive_double_norm, adaptive_double_norm_ref

__all__ = ["GELU", "AdaptiveDoubleNorm", "Conv2d", "Linear", "RMSNorm", "SiLU"]


def under_autocast(fn, *tensors):
    """fn(*tensors) with autocast's cast done by hand (floating tensors except fp64 to the autocast
    dtype) and autocast off inside, so that a custom Function saves, and differentiates, tensors
    of the dtype its forward computed in. Without autocast: fn(*tensors)."""
    device = next(t for t in tensors if t is not None).device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return fn(*tensors)
    dtype = torch.get_autocast_dtype(device)
    cast = [t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors]
    with torch.autocast(device, enabled=False):
        return fn(*cast)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x.detach(), weight.detach())  # detached: a saved dual would keep its tangent
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        if g is None:
            return None, None, None
        gx = g @ weight if ctx.needs_input_grad[0] else None
        gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb

    @staticmethod
    def jvp(ctx, tx, tw, tb):
        x, weight = ctx.saved_tensors
        with torch.no_grad():  # d(x W^T + b) = tx W^T + x tW^T + tb, no graph
            out = None if tx is None else F.linear(tx, weight.detach())
            if tw is not None:
                out = F.linear(x.detach(), tw) if out is None else out + F.linear(x.detach(), tw)
            if tb is not None:
                out = tb.expand(*x.shape[:-1], tb.shape[-1]).clone() if out is None else out + tb
        return out


class Linear(torch.nn.Linear):
    """torch.nn.Linear whose forward-AD tangent carries no autograd graph (module docstring).
    impl = "torch" runs PyTorch's own (as do GELU, SiLU, RMSNorm and AdaptiveDoubleNorm)."""

    impl = "fused"

    def forward(self, x):
        if self.impl == "torch":
            return F.linear(x, self.weight, self.bias)
        return under_autocast(_LinearFn.apply, x, self.weight, self.bias)


class _ActivationFn(torch.autograd.Function):
    """y = act(x) with dy = act'(x) dx (PyTorch's fused backward kernel, in backward and in jvp)."""

    @staticmethod
    def forward(x, kind):
        return F.gelu(x) if kind == "gelu" else F.silu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0].detach())
        ctx.save_for_forward(inputs[0])
        ctx.kind = inputs[1]
        ctx.set_materialize_grads(False)

    @staticmethod
    def times_derivative(g, x, kind):
        """g * act'(x) with PyTorch's fused backward kernels."""
        if kind == "gelu":
            return torch.ops.aten.gelu_backward(g, x)
        return torch.ops.aten.silu_backward(g, x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (None if g is None else _ActivationFn.times_derivative(g, x, ctx.kind)), None

    @staticmethod
    def jvp(ctx, tx, _):
        (x,) = ctx.saved_tensors
        if tx is None:
            return None
        with torch.no_grad():
            return _ActivationFn.times_derivative(tx, x.detach(), ctx.kind)


class GELU(torch.nn.Module):
    """GELU (exact, erf form) whose tangent carries no autograd graph. Not the tanh approximation:
    on CPU PyTorch's tanh GELU is ~4x slower (34 vs 9 ms forward for 4M floats, 2 threads)."""

    impl = "fused"

    def forward(self, x):
        return F.gelu(x) if self.impl == "torch" else _ActivationFn.apply(x, "gelu")


class SiLU(torch.nn.Module):
    """SiLU whose tangent carries no autograd graph."""

    impl = "fused"

    def forward(self, x):
        return F.silu(x) if self.impl == "torch" else _ActivationFn.apply(x, "silu")


class _RMSNormFn(torch.autograd.Function):
    """y = w x rstd, rstd = 1 / sqrt(mean(x^2) + eps) over the last dim; tangent (no graph)
    t_y = w rstd (tx - xhat mean(xhat tx)) + tw xhat."""

    @staticmethod
    def forward(x, weight, eps):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, eps = inputs
        ctx.save_for_forward(x, weight)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x.detach(), weight.detach())

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        if g is None:
            return None, None, None
        with torch.enable_grad():
            xd, wd = x.detach().requires_grad_(), weight.detach().requires_grad_()
            y = F.rms_norm(xd, (x.shape[-1],), wd, ctx.eps)
            gx, gw = torch.autograd.grad(y, (xd, wd), g)
        return gx, gw, None

    @staticmethod
    def jvp(ctx, tx, tw, _):
        x, weight = ctx.saved_tensors
        with torch.no_grad():
            x = x.detach()
            rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + ctx.eps)
            xhat = x * rstd
            out = None
            if tx is not None:
                out = weight.detach() * rstd * (tx - xhat * (xhat * tx).mean(-1, keepdim=True))
            if tw is not None:
                out = xhat * tw if out is None else out + xhat * tw
        return out


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim with a weight, whose tangent carries no autograd graph."""

    impl = "fused"

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        weight = self.weight.to(x.dtype)  # under autocast x is bf16/fp16 and the weight fp32
        if self.impl == "torch":
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return _RMSNormFn.apply(x, weight, self.eps)


class AdaptiveDoubleNorm(torch.nn.Module):
    """norm(x) * pnorm(scale) + pnorm(shift) with (scale, shift) = Linear(emb) (scm-reference.md §5).

    Replaces AdaGN / adaLN modulation: `channels` is C of x, `emb_dim` the width of the conditioning
    embedding (time, class, guidance). norm: "layer", "rms" or "group" (with num_groups); affine
    adds the inner norm's elementwise weight (and bias, except for rms). x is (B, L, C), (B, C) or
    (B, C, *spatial) as in `scm_fast.ops.adaptive_double_norm`; emb is (B, emb_dim).
    `impl = "torch"` swaps the fused op for the PyTorch composition (the reference), e.g. to
    benchmark against what a codebase without the fused op runs.
    """

    impl = "fused"

    def __init__(self, channels, emb_dim, norm="layer", num_groups=None, eps=1e-6, affine=False,
                 channels_last=None):
        super().__init__()
        if norm == "group" and num_groups is None:
            num_groups = min(32, channels)
            while channels % num_groups:
                num_groups -= 1
        self.channels, self.norm, self.num_groups, self.eps = channels, norm, num_groups, eps
        self.channels_last = channels_last
        self.emb = Linear(emb_dim, 2 * channels)  # -> (scale, shift)
        self.weight = torch.nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(channels)) if affine and norm != "rms" else None

    def forward(self, x, emb):
        scale, shift = self.emb(emb).chunk(2, dim=-1)
        kw = dict(norm=self.norm, num_groups=self.num_groups, eps=self.eps, channels_last=self.channels_last)
        if self.impl == "torch":
            cl = x.dim() <= 3 if self.channels_last is None else self.channels_last
            return adaptive_double_norm_ref(x, scale, shift, self.weight, self.bias, **{**kw, "channels_last": cl})
        return adaptive_double_norm(x, scale, shift, weight=self.weight, bias=self.bias, **kw)

    def extra_repr(self):
        groups = f", num_groups={self.num_groups}" if self.norm == "group" else ""
        return f"{self.channels}, norm={self.norm!r}{groups}, eps={self.eps}, affine={self.weight is not None}"


class _Conv2dFn(torch.autograd.Function):
    """y = conv2d(x, W) + b (zero padding already in `padding`); tangent (no graph)
    t_y = conv2d(tx, W) + conv2d(x, tW) + tb; gradients with aten.convolution_backward."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x.detach(), weight.detach())  # detached: a saved dual would keep its tangent
        ctx.save_for_forward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias, ctx.out_shape = bias is not None, output.shape
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        if g is None:
            return (None,) * 7
        stride, padding, dilation, groups = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, mask)
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def jvp(ctx, tx, tw, tb, *_):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        with torch.no_grad():  # d(conv(x, W) + b) = conv(tx, W) + conv(x, tW) + tb, no graph
            out = None if tx is None else F.conv2d(tx, weight.detach(), None, stride, padding, dilation, groups)
            if tw is not None:
                t = F.conv2d(x.detach(), tw, None, stride, padding, dilation, groups)
                out = t if out is None else out + t
            if tb is not None:
                tb = tb[:, None, None]
                out = tb.expand(ctx.out_shape).clone() if out is None else out + tb
        return out


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d whose forward-AD tangent carries no autograd graph (module docstring).

    Any padding / padding_mode of torch.nn.Conv2d: string padding ("same") and non-zero modes are
    applied with F.pad before the convolution (F.pad's tangent is a pad of tx: no graph). Under
    autocast the inputs are cast to the autocast dtype first (as autocast does for F.conv2d), so
    the backward sees one dtype. impl = "torch" runs torch.nn.Conv2d's own forward.
    Double backward is incomplete: saved tensors are detached (as in Linear), so second derivatives
    through x and W are dropped.
    """

    impl = "fused"

    def forward(self, x):
        if self.impl == "torch":
            return super().forward(x)
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        weight, bias = self.weight, self.bias
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        args = (self.stride, padding, self.dilation, self.groups)
        y = under_autocast(lambda x, w, b: _Conv2dFn.apply(x, w, b, *args), x, weight, bias)
        return y.squeeze(0) if unbatched else y


# ---- attention module on the fused op (for use in other codebases) ----------------------------
from scm_fast.ops.attention import attention as _attention  # noqa: E402

# Kept out of torch.compile graphs: inside one, PyTorch drops the fused op's custom jvp.
_attention_eager = torch.compiler.disable(_attention)


def _positive_int(name, value, none_ok=False):
    if (value is None and none_ok) or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    raise ValueError(f"{name} must be a positive int{' or None' if none_ok else ''}, got {value!r}")


def _check_sizes(dim, heads, kv_heads, context_dim):
    for name, value in (("dim", dim), ("heads", heads), ("kv_heads", kv_heads)):
        _positive_int(name, value)
    _positive_int("context_dim", context_dim, none_ok=True)
    if dim % heads or heads % kv_heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads}) and heads a multiple of "
                         f"kv_heads ({kv_heads})")


def _shape_of(x):
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class Attention(torch.nn.Module):
    """Multi-head attention on scm_fast's fused op: qkv Linear -> optional QK RMSNorm -> attention ->
    output Linear; x (B, L, dim) -> (B, L, dim). Under torch.func.jvp one kernel gives the output and
    its tangent, and every layer's tangent carries no autograd graph.

    heads: query heads; kv_heads: key/value heads (GQA/MQA; a divisor of heads, default heads);
    context_dim: cross-attention (keys and values from `context` (B, S, context_dim)); qk_norm:
    RMSNorm (with weight) over each head of q and k; bias: of the projections.
    forward(x, context=None, attn_mask=None, causal=False, block_mask=None): attn_mask as in
    scm_fast.ops.attention, broadcastable to (B, heads, L, S), bool (True = attend) or additive;
    block_mask a BlockSparse, flex BlockMask or mask_mod over (heads, L, S) (dead tiles skipped).
    The fused op is compiler-disabled (runs eagerly inside torch.compile: a graph break).
    `impl = "sdpa"` calls F.scaled_dot_product_attention instead.
    """

    impl = "fused"

    def __init__(self, dim, heads, *, kv_heads=None, context_dim=None, qk_norm=True, bias=True, eps=1e-6):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        _check_sizes(dim, heads, kv_heads, context_dim)
        self.dim, self.context_dim = dim, context_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        kv = 2 * kv_heads * self.head_dim
        self.cross = context_dim is not None
        if self.cross:
            self.q = Linear(dim, dim, bias=bias)
            self.kv = Linear(context_dim, kv, bias=bias)
        else:
            self.qkv = Linear(dim, dim + kv, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else torch.nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else torch.nn.Identity()
        self.proj = Linear(dim, dim, bias=bias)

    def _heads(self, x, n):
        return x.reshape(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)  # (B, n, L, D)

    def _check_inputs(self, x, context):
        if self.cross != (context is not None):
            raise ValueError("context must be given exactly when the module was built with context_dim")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, L, dim) = (B, L, {self.dim}), got {_shape_of(x)}")
        if self.cross and (not isinstance(context, torch.Tensor) or context.dim() != 3
                           or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_dim):
            raise ValueError(f"context must be (B, S, context_dim) = ({x.shape[0]}, S, {self.context_dim}), "
                             f"got {_shape_of(context)}")

    def forward(self, x, context=None, attn_mask=None, causal=False, block_mask=None):
        self._check_inputs(x, context)
        if block_mask is not None and self.impl == "sdpa":
            raise ValueError("block_mask needs impl = 'fused' (F.scaled_dot_product_attention has no block mask)")
        B, L, C = x.shape
        if self.cross:
            q, kv = self.q(x), self.kv(context)
        else:
            q, kv = self.qkv(x).split([C, 2 * self.kv_heads * self.head_dim], dim=-1)
        k, v = kv.chunk(2, dim=-1)
        q = self.q_norm(self._heads(q, self.heads))
        k, v = self.k_norm(self._heads(k, self.kv_heads)), self._heads(v, self.kv_heads)
        if self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                               enable_gqa=self.kv_heads != self.heads)
        else:
            o = _attention_eager(q, k, v, attn_mask=attn_mask, causal=causal, block_mask=block_mask)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


def swap_adaptive_norm(model, **kwargs):
    """Replace diffusers' adaLN / AdaGN modulation with adaptive double normalization; the same
    function as scm_fast.interop.swap_adaptive_norm (see there for what it swaps and what it cannot)."""
    from scm_fast.interop.diffusers_norm import swap_adaptive_norm as swap  # lazy: loaded on first use
    return swap(model, **kwargs)


__all__ += ["Attention", "swap_adaptive_norm"]
