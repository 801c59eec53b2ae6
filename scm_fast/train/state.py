"""CheckpointIO: saving and restoring everything a run needs to continue bit for bit (the files
are named in scm_fast.runs; writing is crash-safe through scm_fast.checkpoint).

Replicated runs (one process, DDP): rank 0 writes the full weights, the EMAs, meta and state
(optimizer and EMA state inside); every rank writes its RNG. FSDP2 runs: the weights and optimizer
go through torch.distributed.checkpoint (dcp/), each rank writes its EMA shards; rank 0 still
writes full weights and EMAs for sampling. Resuming needs the same --parallel (and, for FSDP2,
the same world size)."""
import shutil
from pathlib import Path

import torch

from scm_fast import checkpoint, runs
from scm_fast.train.distributed import RunError, full_like_params, full_state
from scm_fast.train.step import Counters


class CheckpointIO:
    def __init__(self, run_dir, cfg, proc, log, faults=None):
        self.root = Path(run_dir) / runs.CHECKPOINTS
        self.cfg, self.proc, self.log, self.faults = cfg, proc, log, faults
        self.sharded = cfg.parallel == "fsdp" and proc.world > 1

    # ---- saving
    def save(self, parts, counters):
        """Write ckpt-<step> (collective: every rank calls it). Old checkpoints are pruned first so that
        the directory never holds more than --keep-ckpts (at least one stays until the new one is in);
        a write that fails (disk full, read-only) removes its partial files and stops the run."""
        proc = self.proc
        if proc.rank == 0:
            checkpoint.make_room(self.root, self.cfg.keep_ckpts, log=self.log)
        staged = checkpoint.stage(self.root, counters.step, rank=proc.rank)
        proc.barrier()
        try:
            self._write(staged, parts, counters)
            proc.barrier()
            if proc.rank == 0:
                checkpoint.commit(staged, keep=self.cfg.keep_ckpts, log=self.log)
        except OSError as err:
            if proc.rank == 0:
                shutil.rmtree(staged, ignore_errors=True)
            raise RunError(f"the checkpoint of step {counters.step} could not be written ({err.strerror}: "
                           f"{err.filename or staged}); it was removed and the checkpoints before it are intact: "
                           "free space (or lower --keep-ckpts) and rerun to resume") from None
        proc.barrier()

    def _write(self, staged, parts, counters):
        proc = self.proc
        if self.faults is not None:
            self.faults.point("ckpt")
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

    def _save_sharded(self, staged, parts):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(_dcp_module(parts), parts.opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(staged / runs.DCP))

    def _meta(self, parts, counters):
        return {"config": self.cfg.to_dict(), "shape": list(parts.data.shape), "num_classes": parts.num_classes,
                "ema_names": _ema_names(parts), "step": counters.step, "cur_nimg": counters.cur_nimg,
                "world_size": self.proc.world, "cond_keys": list(parts.data.cond_keys),
                **({"diffusers": parts.spec.to_dict()} if parts.spec is not None else {})}

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
        """Restore the newest checkpoint that verifies and loads into `parts`; its Counters, or None
        when the run has none. Newer ones that cannot be used are moved aside (kept, never pruned);
        when checkpoints exist but none can be used the run stops with the reasons (RunError)."""
        proc = self.proc
        found = proc.broadcast([str(p) for p in checkpoint.list_checkpoints(self.root)] if proc.rank == 0 else None)
        unusable = []
        for i, path in enumerate(map(Path, reversed(found))):
            reason, state = self._try_load(path, parts)
            if reason is None:
                if proc.rank == 0:
                    for bad, _ in unusable:
                        checkpoint.quarantine(bad, log=self.log)
                self.log(f"resumed from {path} at step {state['step']} ({state['cur_nimg'] / 1000:g} kimg)")
                return Counters(state["step"], state["cur_nimg"], state["skipped"], state["nonfinite_in_a_row"])
            more = "trying the previous one" if i + 1 < len(found) else "no older checkpoint left"
            self.log(f"checkpoint {path} is unusable: {reason}; {more}")
            unusable.append((path, reason))
        if unusable:
            raise RunError(f"none of the {len(unusable)} checkpoints under {self.root} can be used ("
                           + "; ".join(f"{p.name}: {r}" for p, r in unusable) + "). Nothing was changed: move "
                           "them away to start this run over, or restore them")
        return None

    def _try_load(self, path, parts):
        """(None, its state) when every rank loaded `path` into parts, else (why not, None); all ranks agree."""
        reason, state = None, None
        if self.proc.rank == 0:
            try:
                checkpoint.verify(path)
            except checkpoint.CheckpointError as err:
                reason = f"{err.file}: {err.reason}"
        reason = self.proc.broadcast(reason)
        if reason is not None:
            return reason, None
        try:
            state = self._load(path, parts)
        except (checkpoint.CheckpointError, ValueError, RuntimeError, KeyError, TypeError) as err:
            reason = f"it verifies but does not load ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
        failed = self.proc.all_sum(torch.tensor([float(reason is not None)], device=self.proc.device)).item()
        reason = reason or ("it does not load on another rank" if failed else None)
        return reason, (state if reason is None else None)

    def _load(self, path, parts):
        meta = checkpoint.read_object(path, runs.META)
        state = checkpoint.read_object(path, runs.STATE)
        written_sharded = meta["config"]["parallel"] == "fsdp" and meta["world_size"] > 1
        if self.sharded != written_sharded:
            raise RunError(f"{path}: written by a {'FSDP2' if written_sharded else 'DDP'} run; resume "
                           f"it with the same --parallel (and world size for FSDP2)")
        if self.sharded:
            self._load_sharded(path, meta, parts)
        else:
            self._load_replicated(path, state, parts)
        parts.scaler.load_state_dict(state["scaler"])
        parts.sampler.load_state_dict(state["sampler"])
        parts.gen.set_state(state["generator"])
        self._load_rng(path)
        return state

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
        runs.load_weights(parts.raw_net, net_w, path / f"{runs.MODEL}.safetensors")
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
