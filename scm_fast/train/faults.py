"""Stopping cleanly and fault injection for the tests.

SIGTERM / SIGINT, by phase of the run:
- setup (data, networks, resume): noted; the run stops once set up, exit 0, nothing trained;
- training: the step in progress finishes, every rank agrees (the flag travels in the step's
  all-reduce), a checkpoint is written and the run exits 0;
- the final sampling and evaluation (the final checkpoint is already written): they are stopped at
  once (StopRequested), exit 0; a rerun samples and evaluates again.

SCM_FAST_FAULT (comma-separated): `nan@S` makes the loss of step S non-finite on every rank;
`kill@S:R` kills rank R with SIGKILL at step S on the first attempt (TORCHELASTIC_RESTART_COUNT
0), to test `torchrun --max-restarts`; `term@POINT` sends this process SIGTERM at POINT (setup:
before the networks are built; ckpt: inside the first checkpoint write; eval: as the final
evaluation starts); `killio@N` (scm_fast.checkpoint) SIGKILLs at the N-th checkpoint file operation.
"""
import os
import signal
import sys


def parse_faults(text):
    """SCM_FAST_FAULT -> {"nan": {steps}, "kill": {(step, rank)}}."""
    faults = {"nan": set(), "kill": set(), "term": set(), "killio": set()}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        kind, _, where = item.partition("@")
        if kind == "nan":
            faults["nan"].add(int(where))
        elif kind == "kill":
            step, _, rank = where.partition(":")
            faults["kill"].add((int(step), int(rank or 0)))
        elif kind == "term" and where in TERM_POINTS:
            faults["term"].add(where)
        elif kind == "killio":
            faults["killio"].add(int(where))
        else:
            raise ValueError(f"SCM_FAST_FAULT: unknown fault {item!r} (expected nan@STEP, kill@STEP:RANK, "
                             f"term@{'|'.join(TERM_POINTS)} or killio@N)")
    return faults


TERM_POINTS = ("setup", "ckpt", "eval")


class StopRequested(Exception):
    """A signal during the final sampling / evaluation (raised by the handler, in the main thread)."""


_SAYS = {"setup": "stopping once set up (nothing is trained)", "train": "finishing the step, then checkpointing"}


class Faults:
    """The faults SCM_FAST_FAULT asks for, and what the signal handlers saw.

    signal_received: the last SIGTERM / SIGINT of this process (None: none); stop_agreed: some rank
    received one, as of the last step's all-reduce (what every rank acts on, at the same step)."""

    def __init__(self, rank, log, text=None):
        self.rank, self.log = rank, log
        self.planned = parse_faults(os.environ.get("SCM_FAST_FAULT") if text is None else text)
        self.signal_received, self.stop_agreed, self.phase = None, False, "setup"

    def install_signal_handlers(self):
        def handler(signum, _frame):
            first, self.signal_received = self.signal_received is None, signum
            if self.phase == "finish":
                raise StopRequested(signum)
            if first:
                self.log(f"received signal {signum}: {_SAYS[self.phase]}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def nan_at(self, step):
        """Whether step `step` (1-based) gets a non-finite loss."""
        return step in self.planned["nan"]

    def point(self, where):
        """SIGTERM this process at `where` once, when SCM_FAST_FAULT asks for term@where."""
        if where in self.planned["term"]:
            self.planned["term"].discard(where)
            os.kill(os.getpid(), signal.SIGTERM)

    def maybe_kill(self, step):
        """SIGKILL this process before step `step` (1-based) when asked to, on the first attempt only."""
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if (step, self.rank) in self.planned["kill"] and first_attempt:
            print(f"fault injection: killing rank {self.rank} at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
