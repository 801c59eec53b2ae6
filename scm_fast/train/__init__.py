"""The scm_fast trainer: `python -m scm_fast.train` or `torchrun --nproc_per_node=N -m scm_fast.train`.

Trains TrigFlow diffusion teachers, sCT, sCD and MeanFlow models (scm-reference.md) with DDP (default)
or FSDP2 (`--parallel fsdp`), gloo on CPU and nccl on CUDA. With no arguments: sCT on the embedded
digits data, on the CPU, in a few minutes. `--dry-run` prints the resolved config, the parameter
count and the memory per device. Re-running the same command resumes from the newest good
checkpoint of the run directory. `python -m scm_fast.train --help` lists every flag
(docs/train-help.txt).

The package, one job per file:
    loop.py         training_loop: set up, resume, step, log, checkpoint, sample, stop, finish; main()
    build.py        the run's Parts: data, network, sCD teacher, initial weights, weight head, wrappers,
                    optimizer, loss scaler, EMA, data order, noise
    step.py         one optimizer step: the objective under autocast, backward, grad norms, clip, EMA
    state.py        CheckpointIO: save / resume every part bit for bit (file names in scm_fast.runs)
    distributed.py  Dist (ranks, devices, process group), DDP / FSDP2 wrapping, activation checkpointing
    evaluate.py     sample grids and the final FD
    runlog.py       log.txt, stats.jsonl, TensorBoard, progress
    faults.py       SIGTERM / SIGINT handling, SCM_FAST_FAULT fault injection
    dry_run.py      --dry-run: config, parameters, memory per device
"""
from scm_fast.train.distributed import Dist, NonFiniteStop, RunError, block_modules, checkpoint_blocks
from scm_fast.train.loop import main, training_loop
from scm_fast.train.step import lr_at

_MOVED = {"LossScaler": "build", "make_optimizer": "build", "parse_faults": "faults",
          "saved_activation_bytes": "dry_run"}


def __getattr__(name):
    """Deprecated aliases (one release) of names scm_fast/train.py held before it became this package."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings
    where = f"scm_fast.train.{_MOVED[name]}"
    warnings.warn(f"scm_fast.train.{name} moved to {where}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(where), name)


__all__ = ["Dist", "NonFiniteStop", "RunError", "block_modules", "checkpoint_blocks", "lr_at", "main", "training_loop"]
