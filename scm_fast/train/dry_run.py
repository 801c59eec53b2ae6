"""`--dry-run`: the resolved config, the parameter count and the estimated memory per device, without
data, weights or a process group (the network is built on the meta device, activations measured on
fake tensors)."""
from pathlib import Path

import torch

from scm_fast import config
from scm_fast.models import build_network
from scm_fast.precision import autocast_dtype
from scm_fast.train import build
from scm_fast.train.distributed import block_modules

TEXT_LEN = 512  # --arch diffusers: caption tokens in the activation estimate (T5-XXL's usual length)
# the paper's data sets (shape, classes) for presets whose --data is not on this machine
_PAPER_DATA = {"cifar10": ((3, 32, 32), 10), "imagenet64": ((3, 64, 64), 1000), "imagenet512": ((4, 64, 64), 1000)}


def dry_run(cfg, world_size):
    """Print the resolved config, parameter count and estimated memory per device."""
    shape, K = _data_shape(cfg)
    K = K if cfg.class_cond else 0
    build_net = lambda: build_network(cfg, shape, K)  # noqa: E731
    with torch.device("meta"):
        net = build_net()
    n_params = sum(p.numel() for p in net.parameters())
    act, block_inputs = saved_activation_bytes(build_net, shape, K, cfg)
    parts = estimate_memory(cfg, n_params, act, block_inputs, len(block_modules(net)), world_size)
    print(config.dumps(cfg))
    if cfg.arch == "diffusers":
        print(f"--arch diffusers: activations measured with {TEXT_LEN} caption tokens; the sCD teacher counted "
              f"in fp32 (a bf16 teacher halves it)")
    print(f"data shape {shape}, {K} classes; network {cfg.arch} {cfg.model}: {n_params:,} parameters "
          f"({n_params / 1e6:.1f} M)")
    print(f"estimated memory per device, world size {world_size}, {cfg.parallel}, {cfg.precision}, batch "
          f"{max(cfg.batch // world_size, 1)} per device{', activation checkpointing' if cfg.act_ckpt else ''}:")
    for k, v in parts.items():
        print(f"  {k:<22} {format_bytes(v)}")
    return 0


def estimate_memory(cfg, n_params, act_per_image, block_inputs_per_image, n_blocks, world_size):
    """Bytes per device, by part. Weights, gradients and optimizer state in fp32 (Adam/RAdam: 2
    moments), EMA copies in fp32; FSDP2 divides all of those by the world size, DDP keeps them
    whole. Activations: what autograd saves per image (measured on fake tensors under the run's
    autocast, saved_activation_bytes) times the batch per device. The one-pass JVP's tangents
    live one layer at a time (no graph): about one block's share. Activation checkpointing keeps
    the blocks' inputs plus one block's activations during its recompute."""
    shard = world_size if cfg.parallel == "fsdp" else 1
    n_ema = len(cfg.ema_sigma_rels) if cfg.ema == "power" else (0 if cfg.ema == "none" else 1)
    local_batch = max(cfg.batch // world_size, 1)
    per_block = act_per_image * local_batch / max(n_blocks, 1)
    saved = act_per_image * local_batch
    if cfg.act_ckpt:
        saved = block_inputs_per_image * local_batch + per_block
    parts = {
        "weights": 4 * n_params / shard,
        "gradients": 4 * n_params / shard,
        "optimizer": 8 * n_params / shard,
        "ema": 4 * n_ema * n_params / shard,
        "activations": saved,
        "tangents (transient)": per_block,
    }
    if cfg.objective == "scd":
        parts["teacher (no grad)"] = 4 * n_params / shard
    parts["total"] = sum(parts.values())
    return parts


def format_bytes(n):
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _data_shape(cfg):
    if cfg.arch == "diffusers" and (not cfg.data or cfg.data == "digits" or not Path(cfg.data).exists()):
        from scm_fast.models import diffusers_net  # noqa: PLC0415
        spec = diffusers_net.read_spec(cfg.model, cfg.prediction, cfg.time_scale)
        side = cfg.img_size or spec.config.get("sample_size") or 128
        side = side[-1] if isinstance(side, (list, tuple)) else side
        return (diffusers_net.input_channels(spec), side, side), 0
    family = cfg.preset.split("-")[0]
    if cfg.data == "digits":
        return (1, cfg.img_size or 8, cfg.img_size or 8), 10
    if family in _PAPER_DATA and (not cfg.data or not Path(cfg.data).exists()):
        (C, H, W), K = _PAPER_DATA[family]
        return (C, cfg.img_size or H, cfg.img_size or W), K
    ds = build.dataset(cfg)
    return ds.shape, ds.num_classes


def saved_activation_bytes(build_net, shape, num_classes, cfg):
    """(bytes autograd saves for backward per image, bytes of the blocks' inputs per image),
    measured by running the network on fake tensors (no memory) under the run's autocast, for
    batch 2 minus batch 1 (the weights that layers save cancel out)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    dtype = autocast_dtype(cfg.precision)
    counts = []
    with FakeTensorMode():
        net = build_net()
        for b in (1, 2):
            saved, inputs = [0], [0]
            hooks = [m.register_forward_pre_hook(lambda _m, a, kw: inputs.__setitem__(0, inputs[0] + _first(a, kw)),
                                                 with_kwargs=True)
                     for m in block_modules(net)]
            x, t = torch.empty(b, *shape), torch.full((b,), 0.5)
            kw = {"labels": torch.zeros(b, dtype=torch.long)} if num_classes else {}
            if hasattr(net, "example_cond"):  # a diffusers model: its text inputs at a T5-like length
                kw.update(net.example_cond(b, text_len=TEXT_LEN))
            if cfg.objective == "scd":
                kw["guidance"] = torch.ones(b)
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda v: saved.__setitem__(0, saved[0] + _nbytes(v)) or v, lambda v: v), \
                    torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                net(x, t, **kw)
            for h in hooks:
                h.remove()
            counts.append((saved[0], inputs[0]))
    return counts[1][0] - counts[0][0], counts[1][1] - counts[0][1]


def _first(args, kwargs):
    """Bytes of a block's first input (diffusers blocks take hidden_states by keyword)."""
    first = args[0] if args else next(iter(kwargs.values()), None)
    return _nbytes(first)


def _nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
