"""Stopping cleanly and fault injection for the tests.

SIGTERM / SIGINT set a flag; the step in progress finishes, every rank agrees (the flag travels
in the step's all-reduce), a checkpoint is written and the run exits 0.

SCM_FAST_FAULT (comma-separated): `nan@S` makes the loss of step S non-finite on every rank;
`kill@S:R` kills rank R with SIGKILL at step S on the first attempt (TORCHELASTIC_RESTART_COUNT
0), to test `torchrun --max-restarts`.
"""
import os
import signal
import sys


def parse_faults(text):
    """SCM_FAST_FAULT -> {"nan": {steps}, "kill": {(step, rank)}}."""
    faults = {"nan": set(), "kill": set()}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        kind, _, where = item.partition("@")
        if kind == "nan":
            faults["nan"].add(int(where))
        elif kind == "kill":
            step, _, rank = where.partition(":")
            faults["kill"].add((int(step), int(rank or 0)))
        else:
            raise ValueError(f"SCM_FAST_FAULT: unknown fault {item!r} (expected nan@STEP or kill@STEP:RANK)")
    return faults


class Faults:
    """The faults SCM_FAST_FAULT asks for, and the stop flag the signal handlers set."""

    def __init__(self, rank, log, text=None):
        self.rank, self.log = rank, log
        self.planned = parse_faults(os.environ.get("SCM_FAST_FAULT") if text is None else text)
        self.stop_requested = False

    def install_signal_handlers(self):
        def handler(signum, _frame):
            self.stop_requested = True
            self.log(f"received signal {signum}: finishing the step, then checkpointing")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def nan_at(self, step):
        """Whether step `step` (1-based) gets a non-finite loss."""
        return step in self.planned["nan"]

    def maybe_kill(self, step):
        """SIGKILL this process before step `step` (1-based) when asked to, on the first attempt only."""
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if (step, self.rank) in self.planned["kill"] and first_attempt:
            print(f"fault injection: killing rank {self.rank} at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
