"""Preemption: SIGTERM or SIGINT ends the training loop at the next loop boundary, resumably.

The signal handlers only set a flag; the action checks it between loop calls (on every worker
at once: any worker's signal stops all of them at the same step), ends the loop at that step
(the Checkpoint action saves `ckpt-<step>`, `finish` writes the summaries), and the app exits
with PREEMPTED_EXIT (75, EX_TEMPFAIL: 'temporary failure, run me again'). The same command
resumes at that step.
"""

from __future__ import annotations

import os
import signal

from absl import logging

from research.errors import PREEMPTED_EXIT
from research.training import cluster
from research.training.actions import Action
from research.training.config import TrainConfig


class Preemption(Action):
    """SIGTERM/SIGINT end the loop at the next boundary, resumably. Use as a context manager
    around training (handlers are restored on exit) and pass it as a loop action; a second
    signal stops at once the usual way."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self.stopped_at: int | None = None  # the step the loop was ended at
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # asked twice: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: checkpointing at the end of this loop call, then exiting "
                        "with status %d (send it again to stop at once)", self.signal_name,
                        PREEMPTED_EXIT)

    def before(self, ctx):
        if self._previous and not getattr(self, "_rearmed", False):
            # MultiWorkerMirroredStrategy's coordination service installs its own SIGTERM
            # handler (which only records the signal); ours must be the one that runs.
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
            self._rearmed = True

    def __call__(self, ctx):
        asked = cluster.any_worker(ctx.state.strategy, self.signal_name is not None)
        if not asked or ctx.stop or ctx.step >= ctx.plan.total_steps or self.stopped_at:
            return  # a finishing run just finishes
        self.signal_name = self.signal_name or "a peer worker's signal"
        self.stopped_at = ctx.stop_at = ctx.step  # the Checkpoint action saves at stop_at

    def message(self, cfg: TrainConfig, resume: str = "the same command") -> str:
        return (f"preempted by {self.signal_name} at step {self.stopped_at}: saved "
                f"{os.path.join(cfg.run_dir, f'ckpt-{self.stopped_at}')}; exit status "
                f"{PREEMPTED_EXIT}, {resume} resumes it")
