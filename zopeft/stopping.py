"""SIGTERM and SIGINT during a run: finish the step, save a checkpoint, release the lock, exit 128 + N.

A cluster scheduler sends SIGTERM before it preempts a job (and SIGKILL after a grace period);
Ctrl-C sends SIGINT.  Once the run has finished a step, the first signal is deferred: the step in
progress ends with what is due at it (its log records, the evaluation at ``eval_steps``, so that the
resumed run is bit-identical to one never stopped), a checkpoint of it is saved, and
:class:`Stopped` unwinds the run, which releases the output_dir's lock on the way.  Before the first
step there is nothing to save, and the signal stops the run at once; so does a second signal at any
time (the last checkpoint saved stays).  A signal during the final evaluation and save lets them end.
Under torchrun every rank stops at the step at which rank 0 saw the signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

from .distributed import from_rank0

__all__ = ["StopSignals", "Stopped"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A run stopped by a signal.  ``step``: the step of the checkpoint it saved (None: none saved)."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {self.name}" + (f" after step {step}" if step is not None else ""))

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The conventional status of a process ended by the signal (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signum


class StopSignals:
    """Handles SIGTERM and SIGINT for the duration of a run (in the main thread; elsewhere nothing changes).

    The training loop calls :meth:`requested` after each step (saving a checkpoint when it is
    true) and then :meth:`step_done`, which raises :class:`Stopped` after a requested stop.
    """

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.signum: int | None = None  # the deferred signal
        self.agreed: int | None = None  # the signal every rank stops for at this step (rank 0's)
        self.deferring = False  # a step has finished: there is something to save
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        if kind is None and self.signum is not None:
            self.echo(f"{signal.Signals(self.signum).name} arrived after the last step: the run finished its "
                      "evaluation and saved its adapter")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.deferring or self.signum is not None:
            raise Stopped(signum)
        self.signum = signum
        self.echo(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping "
                  "(send it again to stop at once)")

    def requested(self) -> bool:
        """Whether the run stops after the step just done (rank 0's signal decides for every rank)."""
        self.agreed = from_rank0(self.signum)
        return self.agreed is not None

    def step_done(self, step: int) -> None:
        """A step is done, and its checkpoint saved if :meth:`requested` said so: stop then, else defer from now on."""
        if self.agreed is not None:
            raise Stopped(self.agreed, step)
        self.deferring = True
