"""The run directory and its checkpoints: the one place that names their files and reads their weights.

A run directory (written by `python -m scm_fast.train`, read by `scm_fast.sample`, `scm_fast.eval`
and the experiments):

    config.json          the resolved TrainConfig (config.dumps)
    log.txt, stats.jsonl  the run log and one JSON record per --log-every steps
    samples/*.png        sample grids; eval.json: the final FD on digits
    checkpoints/ckpt-<step>/   one crash-safe checkpoint (scm_fast.checkpoint: MANIFEST.json, atomic commit)
        model.safetensors        the network's weights, plus the weight head's as `logvar.<name>`
        ema-<name>.safetensors   one per EMA the run keeps (halflife-10k, power-0.050, ...)
        meta.pt                  {config, shape, num_classes, ema_names, step, cur_nimg, world_size, cond_keys,
                                  diffusers: the DiffusersSpec of --arch diffusers runs}
        state.pt                 counters, loss scale, data position, noise generator (+ optimizer and
                                 EMA state for replicated runs)
        rng-rank<R>.pt           torch's RNG state of rank R
    diffusers/           --arch diffusers: the student's first EMA as a diffusers model (save_pretrained,
                         scm_fast.models.diffusers_export)
        dcp/, ema-state-rank<R>.pt   FSDP2 runs: sharded weights + optimizer, each rank's EMA shards
"""
from pathlib import Path

from scm_fast import checkpoint, config

CHECKPOINTS = "checkpoints"
MODEL, META, STATE, DCP = "model", "meta", "state", "dcp"
LOGVAR = "logvar."   # prefix of the adaptive weight head's tensors in model.safetensors


def ema_stem(name):
    return f"ema-{name}"


def rng_stem(rank):
    return f"rng-rank{rank}"


def ema_state_stem(rank):
    return f"ema-state-rank{rank}"


def split_logvar(weights):
    """(network weights, weight head weights without the prefix) of a model.safetensors dict."""
    net = {k: v for k, v in weights.items() if not k.startswith(LOGVAR)}
    head = {k[len(LOGVAR):]: v for k, v in weights.items() if k.startswith(LOGVAR)}
    return net, head


def resolve_checkpoint(path):
    """A checkpoint directory from a run directory (its newest good checkpoint) or a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory or a checkpoint directory)")
    if (path / checkpoint.MANIFEST).exists():
        checkpoint.verify(path)
        return path
    found = checkpoint.latest(path / CHECKPOINTS)
    if found is None:
        raise FileNotFoundError(f"no usable checkpoint under {path / CHECKPOINTS}")
    return found


def read_meta(ckpt):
    """(TrainConfig, meta dict) of a checkpoint directory."""
    meta = checkpoint.read_object(ckpt, META)
    return config.from_dict(meta["config"]), meta


def read_weights(ckpt, meta, ema=None):
    """(network weights, the file stem they came from). ema: an EMA name, 'none' for the raw
    weights, or None for the first EMA the run kept (the raw weights if it kept none)."""
    names = meta.get("ema_names", [])
    name = ema if ema is not None else (names[0] if names else "none")
    if name != "none" and name not in names:
        raise ValueError(f"--ema {name!r} not in this run's EMAs {names} (or 'none')")
    stem = MODEL if name == "none" else ema_stem(name)
    return split_logvar(checkpoint.read_tensors(ckpt, stem))[0], stem


def load_weights(net, weights, where):
    """Load a full set of network weights (buffers may be absent); ValueError naming `where` otherwise."""
    missing, unexpected = net.load_state_dict(weights, strict=False)
    buffers = {n for n, _ in net.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise ValueError(f"{where} does not fit the network its config describes: "
                         f"missing {sorted(set(missing) - buffers)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return net


def load_run(path, ema=None, device="cpu"):
    """(network in eval mode with the chosen weights, TrainConfig, meta) of a run or checkpoint;
    `ema` as in read_weights. meta gains `checkpoint` (its path) and `weights` (the file stem)."""
    from scm_fast.models import build_network
    ckpt = resolve_checkpoint(path)
    cfg, meta = read_meta(ckpt)
    weights, stem = read_weights(ckpt, meta, ema)
    net = build_network(cfg, tuple(meta["shape"]), meta["num_classes"], meta.get("diffusers"))
    load_weights(net, weights, ckpt / f"{stem}.safetensors")
    return net.to(device).eval().requires_grad_(False), cfg, {**meta, "checkpoint": str(ckpt), "weights": stem}


__all__ = ["load_run", "load_weights", "read_meta", "read_weights", "resolve_checkpoint", "split_logvar"]
