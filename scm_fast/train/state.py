"""CheckpointIO: saving and restoring everything a run needs to continue bit for bit (the files
are named in scm_fast.runs; writing is crash-safe through scm_fast.checkpoint).

Replicated runs (one process, DDP): rank 0 writes the full weights, the EMAs, meta and state
(optimizer and EMA state inside); every rank writes its RNG. FSDP2 runs: the weights and optimizer
go through torch.distributed.checkpoint (dcp/), each rank writes its EMA shards; rank 0 still
writes full weights and EMAs for sampling. Resuming needs the same --parallel (and, for FSDP2,
the same world size)."""
from pathlib import Path

import torch

from scm_fast import checkpoint, runs
from scm_fast.train.distributed import RunError, full_like_params, full_state
from scm_fast.train.step import Counters


class CheckpointIO:
    def __init__(self, run_dir, cfg, proc, log):
        self.root = Path(run_dir) / runs.CHECKPOINTS
        self.cfg, self.proc, self.log = cfg, proc, log
        self.sharded = cfg.parallel == "fsdp" and proc.world > 1

    # ---- saving
    def save(self, parts, counters):
        """Write ckpt-<step> (collective: every rank calls it)."""
        proc = self.proc
        staged = checkpoint.stage(self.root, counters.step, rank=proc.rank)
        proc.barrier()
        model = full_state(parts.raw_net)
        head = {} if parts.raw_logvar is None else {
            f"{runs.LOGVAR}{k}": v for k, v in full_state(parts.raw_logvar).items()}
        emas = {n: full_like_params(parts.raw_net, parts.ema.averaged(n)) for n in _ema_names(parts)}
        if self.sharded:
            self._save_sharded(staged, parts)
        if proc.rank == 0:
            checkpoint.write_tensors(staged, runs.MODEL, {**model, **head})
            for n, w in emas.items():
                checkpoint.write_tensors(staged, runs.ema_stem(n), w)
            checkpoint.write_object(staged, runs.META, self._meta(parts, counters))
            checkpoint.write_object(staged, runs.STATE, self._state(parts, counters))
        if parts.ema is not None and self.sharded:
            checkpoint.write_object(staged, runs.ema_state_stem(proc.rank), parts.ema.state_dict())
        checkpoint.write_object(staged, runs.rng_stem(proc.rank), self._rng())
        proc.barrier()
        if proc.rank == 0:
            checkpoint.commit(staged, keep=self.cfg.keep_ckpts, log=self.log)
        proc.barrier()

    def _save_sharded(self, staged, parts):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(_dcp_module(parts), parts.opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(staged / runs.DCP))

    def _meta(self, parts, counters):
        return {"config": self.cfg.to_dict(), "shape": list(parts.data.shape), "num_classes": parts.num_classes,
                "ema_names": _ema_names(parts), "step": counters.step, "cur_nimg": counters.cur_nimg,
                "world_size": self.proc.world}

    def _state(self, parts, counters):
        state = {"step": counters.step, "cur_nimg": counters.cur_nimg, "skipped": counters.skipped,
                 "nonfinite_in_a_row": counters.nonfinite_in_a_row, "scaler": parts.scaler.state_dict(),
                 "sampler": parts.sampler.state_dict(), "generator": parts.gen.get_state()}
        if not self.sharded:
            state["optimizer"] = parts.opt.state_dict()
            if parts.ema is not None:
                state["ema"] = parts.ema.state_dict()
        return state

    def _rng(self):
        state = {"torch": torch.get_rng_state()}
        if self.proc.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.proc.device)
        return state

    # ---- resuming
    def resume(self, parts):
        """Restore the newest good checkpoint into `parts`; its Counters, or None when there is none."""
        proc = self.proc
        found = checkpoint.latest(self.root, log=self.log) if proc.rank == 0 else None
        found = proc.broadcast(None if found is None else str(found))
        if found is None:
            return None
        path = Path(found)
        meta = checkpoint.read_object(path, runs.META)
        state = checkpoint.read_object(path, runs.STATE)
        if self.sharded != ("optimizer" not in state):
            raise RunError(f"{path}: written by a {'FSDP2' if 'optimizer' not in state else 'DDP'} run; resume "
                           f"it with the same --parallel (and world size for FSDP2)")
        if self.sharded:
            self._load_sharded(path, meta, parts)
        else:
            self._load_replicated(path, state, parts)
        parts.scaler.load_state_dict(state["scaler"])
        parts.sampler.load_state_dict(state["sampler"])
        parts.gen.set_state(state["generator"])
        self._load_rng(path)
        self.log(f"resumed from {path} at step {state['step']} ({state['cur_nimg'] / 1000:g} kimg)")
        return Counters(state["step"], state["cur_nimg"], state["skipped"], state["nonfinite_in_a_row"])

    def _load_rng(self, path):
        stem = runs.rng_stem(self.proc.rank)
        if not (path / f"{stem}.pt").exists():
            return
        rng = checkpoint.read_object(path, stem)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.proc.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.proc.device)

    def _load_replicated(self, path, state, parts):
        net_w, head_w = runs.split_logvar(checkpoint.read_tensors(path, runs.MODEL))
        parts.raw_net.load_state_dict(net_w, strict=False)
        if parts.raw_logvar is not None:
            parts.raw_logvar.load_state_dict(head_w)
        parts.opt.load_state_dict(state["optimizer"])
        if parts.ema is not None:
            parts.ema.load_state_dict(state["ema"])

    def _load_sharded(self, path, meta, parts):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        if meta["world_size"] != self.proc.world:
            raise RunError(f"{path}: an FSDP2 checkpoint of world size {meta['world_size']}; this launch has "
                           f"{self.proc.world} (its EMA shards are per rank)")
        module = _dcp_module(parts)
        msd, osd = get_state_dict(module, parts.opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(path / runs.DCP))
        set_state_dict(module, parts.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        if parts.ema is not None:
            parts.ema.load_state_dict(checkpoint.read_object(path, runs.ema_state_stem(self.proc.rank)))


def _ema_names(parts):
    return list(parts.ema.names) if parts.ema is not None else []


def _dcp_module(parts):
    # one module: torch.distributed.checkpoint's get_state_dict/set_state_dict take a single nn.Module
    mods = {"net": parts.raw_net}
    if parts.raw_logvar is not None:
        mods["logvar"] = parts.raw_logvar
    return torch.nn.ModuleDict(mods)
