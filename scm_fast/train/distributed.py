"""Processes, devices and the parallel wrappers: DDP (default) or FSDP2 (`--parallel fsdp`), gloo on
CPU and nccl on CUDA, activation checkpointing, and full (gathered) tensors for saving and sampling."""
import contextlib
import os

import torch
import torch.distributed as dist


class RunError(Exception):
    """A problem with the user's flags, files or run directory: main() prints it and exits with
    `exit_code` (no traceback)."""
    exit_code = 1


class NonFiniteStop(RunError):
    """--max-nonfinite non-finite steps in a row: the run checkpointed and stopped (exit status 3)."""
    exit_code = 3


class Dist:
    """rank, world size and device of this process; a no-op wrapper when world_size == 1."""

    def __init__(self, device_choice="auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
        if cuda and not torch.cuda.is_available():
            raise RunError("--device cuda: no CUDA device is available")
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            self._init_group("nccl" if cuda else "gloo")

    def _init_group(self, backend):
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend)
            return
        # torchrun keeps its TCPStore across --max-restarts attempts, so a restarted group would
        # read the previous attempt's keys (gloo then connects to dead ports): one prefix per attempt.
        store, _, _ = next(dist.rendezvous("env://", self.rank, self.world))
        dist.init_process_group(backend, store=dist.PrefixStore(f"scm_fast/attempt-{attempt}", store),
                                rank=self.rank, world_size=self.world)

    def all_sum(self, t):
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def block_modules(net):
    """The repeated blocks of a network (FSDP2 units, activation-checkpointing units): its
    `repeated_blocks()` (scm_fast's networks; others: none, the whole network is one unit)."""
    blocks = getattr(net, "repeated_blocks", None)
    return blocks() if callable(blocks) else []


def checkpoint_blocks(net):
    """Activation checkpointing (non-reentrant) of every block in passes that record a graph. The
    recompute runs in the network's `recompute_context()` where it has one (a diffusers model's
    attention patch, which the backward is outside of)."""
    from torch.utils.checkpoint import checkpoint as ckpt
    recompute = getattr(net, "recompute_context", None)
    kw = {} if recompute is None else {"context_fn": lambda: (contextlib.nullcontext(), recompute())}
    for block in block_modules(net):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return ckpt(_inner, *args, use_reentrant=False, **kw, **kwargs)
            return _inner(*args, **kwargs)
        block.forward = forward


def wrap(module, proc, parallel):
    """The module as the step calls it: itself on one process, FSDP2 (each block a unit) or DDP."""
    if module is None or proc.world == 1:
        return module
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in block_modules(module):
            fully_shard(block)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [proc.local_rank] if proc.device.type == "cuda" else None
    # broadcast_buffers=False: buffers are constants, and their broadcast is an in-place copy
    # that torch.func.jvp refuses inside the transform.
    return DDP(module, device_ids=ids, broadcast_buffers=False)


def full(t):
    """The whole tensor of a (possibly FSDP2-sharded) DTensor; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t):
    """This rank's shard of a DTensor; other tensors as they are."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state(module):
    """Full weights of a module as CPU tensors (gathered under FSDP2; collective)."""
    return {k: full(v).detach().cpu() for k, v in module.state_dict().items()}


def local_params(net):
    """name -> detached parameter (local shards under FSDP2): what the EMA averages."""
    return {name: local(p).detach() for name, p in net.named_parameters()}


def full_like_params(net, tensors):
    """Full CPU tensors from per-parameter local shards laid out as net's parameters (collective under FSDP2)."""
    out = {}
    for name, p in net.named_parameters():
        t = tensors[name]
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import DTensor
            t = DTensor.from_local(t.to(p.device), p.device_mesh, p.placements,
                                   shape=p.shape, stride=p.stride()).full_tensor()
        out[name] = t.detach().cpu()
    return out
