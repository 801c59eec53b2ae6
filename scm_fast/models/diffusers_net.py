"""A pretrained diffusers transformer or UNet as sCM's network F_theta(x_in, t, labels, guidance, **cond).

The model is read from a local `save_pretrained` folder (a model folder with config.json, or a
pipeline folder whose transformer/ or unet/ is used; never a download). Its output is converted to
TrigFlow's F by the model's parametrisation (interop.schedulers: flow matching, epsilon, v
prediction, EDM), with each family's timestep convention:

    flow    timestep = time_scale * s, s = sin t / (sin t + cos t); time_scale 1000 (SD3, Wan, Sana,
            HunyuanVideo), 1 for models that scale inside (Flux, Qwen-Image, Chroma); a smaller
            --time-scale is the denser time conditioning of SANA-Sprint (c_noise closer to t)
    epsilon / v_prediction   the fractional DDPM timestep of sigma = sigma_d tan t (trigflow.from_vp)
    edm     the denoiser at sigma = sigma_d tan t (trigflow.from_edm)

and each family's input layout: images (B, C, H, W) as they are; Flux packs 2x2 patches into tokens
with their position ids; video models (Wan, HunyuanVideo, ...) see an image as a 1-frame video.

sCM needs (scm-reference.md §4): the time embedding in fp32 (every TimestepEmbedding runs with
autocast off; GroupNorms too, which PyTorch's autocast breaks under torch.func.jvp), the attention
through scm_fast's fused op under torch.func.jvp (patch_sdpa around each call), and for sCD a guidance-conditioned student: Flux's own `guidance` input when the model
has one, else an added embedding of s (zero-initialised, so the student starts as the teacher)
summed into the model's time embedding. Rows whose label is -1 get the dataset's null conditioning
(classifier-free guidance, label dropout).
"""
import contextlib
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from scm_fast import trigflow
from scm_fast.models.embedding import ScalarEmbedding

MODEL_DIRS = ("transformer", "unet")
UNIT_TIMESTEP = ("FluxTransformer2DModel", "QwenImageTransformer2DModel", "ChromaTransformer2DModel")
PACKED_2X2 = ("FluxTransformer2DModel",)
VIDEO = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel",
         "SkyReelsV2Transformer3DModel", "MochiTransformer3DModel")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "down_blocks", "mid_block",
               "up_blocks")
PREDICTIONS = ("auto", "flow", "epsilon", "v_prediction", "edm")


@dataclass
class DiffusersSpec:
    """What builds the network without the folder (kept in each checkpoint's meta)."""
    class_name: str
    config: dict
    kind: str                          # flow | epsilon | v_prediction | edm
    time_scale: float = 1000.0         # flow: timestep = time_scale * s
    alphas_cumprod: list = None        # epsilon / v_prediction: the DDPM schedule
    null_cond: dict = field(default_factory=dict)   # {key: tensor (1, ...)}: the CFG null conditioning

    def to_dict(self):
        return asdict(self)


def model_folder(path, flag="--model"):
    """The folder holding the model's config.json: PATH itself, or its transformer/ or unet/."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{flag} {path}: not a folder (expected a diffusers model or pipeline folder written by "
                         f"save_pretrained)")
    for cand in (path, *(path / d for d in MODEL_DIRS)):
        if (cand / "config.json").is_file() and _model_class(cand, flag, quiet=True):
            return cand
    raise ValueError(f"{flag} {path}: not a diffusers model folder (no config.json naming a diffusers model class "
                     f"in it, {' or '.join(f'{d}/' for d in MODEL_DIRS)})")


def _model_class(folder, flag, quiet=False):
    import diffusers  # noqa: PLC0415 - a pinned dependency, imported when a diffusers model is used
    try:
        name = json.loads((Path(folder) / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        name = ""
    cls = getattr(diffusers, name, None) if name else None
    if cls is None or not issubclass(cls, diffusers.ModelMixin):
        if quiet:
            return None
        raise ValueError(f"{flag} {folder}: config.json names {name!r}, not a diffusers model class")
    return cls


def read_config(path, flag="--model"):
    """(class name, config dict) of a model folder, a pipeline folder or a config.json file."""
    path = Path(path)
    if path.is_file():
        cls = _model_class(path.parent, flag) if path.name == "config.json" else None
        if cls is None:
            raise ValueError(f"{flag} {path}: expected a folder or a config.json")
        return cls.__name__, json.loads(path.read_text())
    folder = model_folder(path, flag)
    return _model_class(folder, flag).__name__, json.loads((folder / "config.json").read_text())


def read_spec(path, prediction="auto", time_scale=0.0, flag="--model"):
    """The DiffusersSpec of the model at `path`; its parametrisation from `prediction`, or (auto) the
    scheduler config beside it (a pipeline's scheduler/), else flow matching for flow-era model classes."""
    from scm_fast.interop import schedulers  # noqa: PLC0415
    name, config = read_config(path, flag)
    info = None
    root = Path(path).parent if Path(path).is_file() else Path(path)
    for cand in (root, model_folder(root, flag) if root.is_dir() else root, root.parent):
        info = info or schedulers.read(cand)
    exported = _exported(root)  # a student / teacher written by scm_fast (RUN/diffusers/scm_fast.json)
    if exported:
        prediction = exported["prediction"] if prediction == "auto" else prediction
        time_scale = time_scale or exported["time_scale"]
    if prediction == "auto":
        if info is None and not _flow_family(name):
            raise ValueError(f"{flag} {path}: no scheduler config beside the model to read its parametrisation "
                             f"from; pass --prediction (one of {', '.join(PREDICTIONS[1:])})")
        kind = info["kind"] if info else "flow"
    elif prediction in PREDICTIONS[1:]:
        kind = prediction
    else:
        raise ValueError(f"--prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    abar = None
    if kind in ("epsilon", "v_prediction"):
        if info is None or "alphas_cumprod" not in info:
            raise ValueError(f"--prediction {kind}: needs the model's DDPM schedule, read from a scheduler config "
                             f"in the pipeline folder ({root}/scheduler/), and there is none")
        abar = [float(a) for a in info["alphas_cumprod"]]
    scale = float(time_scale) if time_scale > 0 else (1.0 if name in UNIT_TIMESTEP else 1000.0)
    return DiffusersSpec(class_name=name, config=config, kind=kind, time_scale=scale, alphas_cumprod=abar)


def _exported(root):
    for cand in (root, root.parent):
        if (cand / "scm_fast.json").is_file():
            return json.loads((cand / "scm_fast.json").read_text())
    return None


def _flow_family(name):
    return name.endswith(("Transformer2DModel", "Transformer3DModel")) and not name.startswith(("DiT", "PixArt"))


def spec_from_dict(d):
    return DiffusersSpec(**d)


def build(spec, guidance_embed=False, sigma_d=trigflow.SIGMA_D):
    """The DiffusersNet of a spec with the model's random init (load weights with load_pretrained)."""
    import diffusers  # noqa: PLC0415
    model = getattr(diffusers, spec.class_name).from_config(spec.config)
    return DiffusersNet(model, spec, guidance_embed, sigma_d)


WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_weights(folder, flag="--model"):
    """The state dict of a save_pretrained folder: its safetensors file, or the shards its index names."""
    from safetensors.torch import load_file  # noqa: PLC0415
    folder = Path(folder)
    index = folder / (WEIGHTS + ".index.json")
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / WEIGHTS).is_file():
            files = [WEIGHTS]
        else:
            raise ValueError(f"no {WEIGHTS} (or its .index.json); save_pretrained with safe_serialization")
        state = {}
        for name in files:
            state.update(load_file(folder / name))
        return state
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{flag} {folder}: its weights cannot be read ({err})") from None


def load_pretrained(net, path, flag="--model"):
    """Load the model weights of a save_pretrained folder into net.model; ValueError naming the flag."""
    state = read_weights(model_folder(path, flag), flag)
    own = net.model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if bad or missing:
        first = bad[0] if bad else missing[0]
        raise ValueError(f"{flag} {path}: its weights do not fit {net.spec.class_name} of this config (first "
                         f"misfit {first}: {tuple(state[first].shape) if first in state else 'absent'} there, "
                         f"{tuple(own[first].shape) if first in own else 'absent'} in the model)")
    net.model.load_state_dict(state)
    return net


class FP32TimestepEmbedding(torch.nn.Module):
    """Marker base: a diffusers TimestepEmbedding whose forward runs in fp32 with autocast off [rCM]."""


def _fp32_time_embedding(model):
    """Every TimestepEmbedding of `model` (its time, guidance and pooled-text MLPs) in fp32, autocast off:
    the class of each instance is swapped for a subclass (weights and state dict unchanged)."""
    from diffusers.models.embeddings import TimestepEmbedding  # noqa: PLC0415
    cls = _fp32_class(TimestepEmbedding)
    names = []
    for name, mod in model.named_modules():
        if type(mod) is TimestepEmbedding:
            mod.__class__ = cls
            names.append(name)
    return names


class FP32GroupNorm(torch.nn.GroupNorm):
    """GroupNorm in fp32 with autocast off, the output in the input's dtype. Under autocast, PyTorch's
    group_norm inside torch.func.jvp mixes a bf16/fp16 input with its fp32 statistics and fails
    ("expected scalar type Float but found BFloat16", UNet2DCondition's ResNet blocks); outside a
    transform autocast would run it in fp32 anyway. Swapped in by class, so the state dict is unchanged."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            w, b = (None if p is None else p.float() for p in (self.weight, self.bias))
            return torch.nn.functional.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _fp32_group_norms(model):
    """Every plain GroupNorm of `model` as FP32GroupNorm."""
    for mod in model.modules():
        if type(mod) is torch.nn.GroupNorm:
            mod.__class__ = FP32GroupNorm


_FP32_CLASSES = {}


def _fp32_class(base):
    if base not in _FP32_CLASSES:
        def forward(self, sample, *args, **kwargs):
            with torch.autocast(sample.device.type, enabled=False):
                return base.forward(self, sample.to(self.linear_1.weight.dtype), *args, **kwargs)
        _FP32_CLASSES[base] = type(f"FP32{base.__name__}", (base, FP32TimestepEmbedding), {"forward": forward})
    return _FP32_CLASSES[base]


class FP32OutputLinear(torch.nn.Linear):
    """A Linear whose output is returned in fp32 (its matmul as autocast runs it)."""

    def forward(self, x):
        return super().forward(x).float()


def _cast_to_autocast_dtype(_module, args, kwargs):
    device = "cuda" if torch.is_autocast_enabled("cuda") else "cpu"
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    cast = lambda h: h.to(dtype) if torch.is_tensor(h) and h.is_floating_point() else h  # noqa: E731
    if "hidden_states" in kwargs:
        return args, dict(kwargs, hidden_states=cast(kwargs["hidden_states"]))
    return (cast(args[0]), *args[1:]) if args else None, kwargs


def _timestep_kept_fp32(model):
    """Flux, Qwen-Image, Chroma, ... cast the timestep to the dtype of their embedded input
    (`timestep.to(hidden_states.dtype)`): under bf16 autocast s ~ 0.98 rounds by 0.004, 4 of Flux's
    1000 timestep units, and the tangent through the time embedding was 12% off fp32 (measured on the
    tiny Flux at t = 1.55). The input embedder's output is kept in fp32 for that cast, and cast to the
    autocast dtype again where the first block reads it (the residual stream as the model has it)."""
    if "timestep.to(hidden_states.dtype)" not in inspect.getsource(type(model).forward):
        return
    name = next((n for n in ("x_embedder", "img_in") if type(getattr(model, n, None)) is torch.nn.Linear), None)
    lists = [getattr(model, b, None) for b in BLOCK_LISTS]
    first = next((m[0] for m in lists if isinstance(m, torch.nn.ModuleList) and len(m)), None)
    if name is not None and first is not None:
        getattr(model, name).__class__ = FP32OutputLinear
        first.register_forward_pre_hook(_cast_to_autocast_dtype, with_kwargs=True)


def _time_embedding(model):
    """The module whose output is the model's time embedding (where an added guidance embedding goes)."""
    for name, mod in model.named_modules():
        if isinstance(mod, FP32TimestepEmbedding) and "guidance" not in name:
            return name, mod
    raise ValueError(f"{type(model).__name__}: no TimestepEmbedding found for the student's guidance embedding")


class DiffusersNet(torch.nn.Module):
    """F_theta(x_in, t, labels=None, guidance=None, **cond) of a diffusers model (module docstring)."""

    def __init__(self, model, spec, guidance_embed=False, sigma_d=trigflow.SIGMA_D):
        super().__init__()
        self.model, self.spec, self.sigma_d = model, spec, float(sigma_d)
        _fp32_time_embedding(model)
        _fp32_group_norms(model)
        _timestep_kept_fp32(model)
        params = inspect.signature(model.forward).parameters
        self.cond_inputs = tuple(n for n in params if n not in ("hidden_states", "sample", "timestep", "return_dict"))
        self.guidance_input = "guidance" in params and bool(spec.config.get("guidance_embeds"))
        self._guidance_now = None
        self.fused_attention = True  # False: PyTorch's SDPA as the model has it (benchmarks' two-pass baseline)
        if guidance_embed and not self.guidance_input:
            name, target = _time_embedding(model)
            self.guidance = ScalarEmbedding(target.linear_2.out_features)
            self.guidance_target = name
            target.register_forward_hook(self._add_guidance)
        for k, v in spec.null_cond.items():
            self.register_buffer(f"null_{k}", torch.as_tensor(v), persistent=False)
        self.abar = None if spec.alphas_cumprod is None else torch.tensor(spec.alphas_cumprod, dtype=torch.float64)

    # ---- conditioning
    def null(self):
        return {k: getattr(self, f"null_{k}") for k in self.spec.null_cond}

    def _with_null(self, labels, cond):
        """cond with the null conditioning in the rows whose label is -1 (CFG's F_u, label dropout)."""
        if labels is None or not self.spec.null_cond:
            return cond
        drop = labels < 0
        out = dict(cond)
        for k, v in self.null().items():
            if k in out:
                m = drop.reshape(-1, *([1] * (out[k].dim() - 1)))
                out[k] = torch.where(m, v.to(out[k].dtype).expand_as(out[k]), out[k])
            else:
                out[k] = v.expand(len(labels), *v.shape[1:])
        return out

    def _add_guidance(self, _module, _inputs, emb):
        s = self._guidance_now
        if s is None:
            return emb
        g = self.guidance(s).to(emb.dtype)
        return emb + g.reshape(g.shape[0], *([1] * (emb.dim() - 2)), g.shape[-1]) if emb.dim() > 2 else emb + g

    def start_as_unguided(self):
        """Zero the guidance embedding's output layer: the student starts as the teacher it copies."""
        if hasattr(self, "guidance"):
            torch.nn.init.zeros_(self.guidance.mlp[-1].weight)
            torch.nn.init.zeros_(self.guidance.mlp[-1].bias)

    def example_cond(self, batch, text_len=512, device=None):
        """Zero conditioning inputs of the sizes the config names (--dry-run's activation measurement)."""
        c = self.spec.config
        dim = next((c[k] for k in ("joint_attention_dim", "text_dim", "cross_attention_dim", "caption_channels")
                    if c.get(k)), None)
        out = {}
        if dim and "encoder_hidden_states" in self.cond_inputs:
            out["encoder_hidden_states"] = torch.zeros(batch, text_len, int(dim), device=device)
        if c.get("pooled_projection_dim") and "pooled_projections" in self.cond_inputs:
            out["pooled_projections"] = torch.zeros(batch, int(c["pooled_projection_dim"]), device=device)
        return out

    def recompute_context(self):
        """The context a checkpointed block's recompute runs in (during backward, outside raw()): the
        attention patch again, so the recompute rounds as the forward did."""
        from scm_fast.interop import patch_sdpa  # noqa: PLC0415
        return patch_sdpa() if self.fused_attention else contextlib.nullcontext()

    def repeated_blocks(self):
        """The model's transformer / UNet blocks: FSDP2 and activation-checkpointing units."""
        blocks = []
        for name in BLOCK_LISTS:
            mod = getattr(self.model, name, None)
            if isinstance(mod, torch.nn.ModuleList):
                blocks.extend(mod)
            elif isinstance(mod, torch.nn.Module):
                blocks.append(mod)
        return blocks

    # ---- the model's call in its own layout and time convention
    def raw(self, x, timestep, guidance=None, **cond):
        """The model's prediction at its own `timestep` for images x (B, C, H, W)."""
        from scm_fast.interop import patch_sdpa  # noqa: PLC0415
        name = self.spec.class_name
        kw = dict(cond)
        if self.guidance_input:
            kw["guidance"] = torch.ones_like(timestep) if guidance is None else guidance.to(timestep.dtype)
        video = name in VIDEO and x.dim() == 4
        h = x.unsqueeze(2) if video else x
        if name in PACKED_2X2:
            h, kw = _pack(h, kw)
        self._guidance_now = None if self.guidance_input else guidance
        try:
            with patch_sdpa() if self.fused_attention else contextlib.nullcontext():
                out = self.model(h, timestep=timestep, return_dict=False, **kw)[0]
        finally:
            self._guidance_now = None
        if name in PACKED_2X2:
            out = _unpack(out, x.shape)
        return out.squeeze(2) if video else out

    def forward(self, x_in, t, labels=None, guidance=None, **cond):
        """TrigFlow's F at (x_t / sigma_d, t) [scm-reference.md §1] from the model's prediction."""
        cond = self._with_null(labels, cond)
        kind, sd = self.spec.kind, self.sigma_d
        if kind == "flow":
            F = trigflow.from_flow_matching(lambda x, s, **c: self.raw(x, s * self.spec.time_scale, guidance, **c), sd)
        elif kind == "edm":
            F = trigflow.from_edm(lambda x, sigma, **c: self.raw(x, sigma, guidance, **c), sd)
        else:
            F = trigflow.from_vp(lambda x, tau, **c: self.raw(x, tau, guidance, **c), self.abar, kind, sd)
        return F(x_in, t, **cond)


def _pack(x, kw):
    """Flux's layout: (B, C, H, W) -> tokens (B, H/2 * W/2, 4C), with img_ids (rows, cols) and txt_ids."""
    B, C, H, W = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"{PACKED_2X2[0]} packs 2x2 latent patches: H and W must be even, got {H}x{W}")
    tokens = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, 4 * C)
    ids = torch.zeros(H // 2, W // 2, 3, device=x.device)
    ids[..., 1] = torch.arange(H // 2, device=x.device)[:, None]
    ids[..., 2] = torch.arange(W // 2, device=x.device)[None, :]
    kw = dict(kw)
    kw.setdefault("img_ids", ids.reshape(-1, 3))
    if "encoder_hidden_states" in kw:
        kw.setdefault("txt_ids", torch.zeros(kw["encoder_hidden_states"].shape[1], 3, device=x.device))
    return tokens, kw


def _unpack(tokens, shape):
    B, C, H, W = shape
    return tokens.reshape(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def input_channels(spec):
    """The image channels the model takes (Flux: its in_channels / 4, the packed 2x2 patches)."""
    c = spec.config.get("in_channels")
    if c is None:
        return None
    return c // 4 if spec.class_name in PACKED_2X2 else c


def check_shape(spec, shape, where):
    """ValueError naming `where` when data of (C, H, W) cannot go through the model."""
    c = input_channels(spec)
    if c is not None and shape[0] != c:
        raise ValueError(f"{where}: the data has {shape[0]} channels, the model {spec.class_name} takes {c} "
                         f"(in_channels {spec.config.get('in_channels')}); use latents of its VAE")
    patch = spec.config.get("patch_size") or 1
    p = patch[-1] if isinstance(patch, (list, tuple)) else patch
    p = 2 if spec.class_name in PACKED_2X2 else p
    if any(s % p for s in shape[1:]):
        raise ValueError(f"{where}: the data's {shape[1]}x{shape[2]} is not divisible by the model's patch {p}")


def time_steps_hint(spec):
    """A line describing the time input, for the run log."""
    if spec.kind == "flow":
        return f"flow matching, timestep = {spec.time_scale:g} * s, s = sin t / (sin t + cos t)"
    if spec.kind == "edm":
        return "EDM denoiser at sigma = sigma_d tan t"
    return f"{spec.kind} on a {len(spec.alphas_cumprod)}-step DDPM schedule"


__all__ = ["DiffusersNet", "DiffusersSpec", "build", "check_shape", "load_pretrained", "model_folder", "read_spec",
           "spec_from_dict"]
