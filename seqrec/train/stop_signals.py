"""Preemption signals during training steps: checkpoint at the next step boundary first, then do what the signal did.

A cluster warns a job before it ends it: SLURM sends `--signal=USR1@<s>` (or USR2, which submitit's requeue hook
handles) ahead of a time limit or preemption, and SIGTERM before its SIGKILL. Without help a signal that arrives in
the middle of an epoch loses the epoch. While training runs, `StopSignals` only notes the signal; the step clock
(seqrec/train/step_clock.py) sees it at its next check, every rank stops on the same step, `last.pt` records the
mid-epoch position, and then the signal does what it did before:
- an earlier Python handler (submitit's requeue) is called, and training goes on if it returns;
- a signal whose default action ends the process ends the run as interrupted (`StoppedBySignal`: one line with the
  resume command, exit status 128 + the signal's number), on every rank.
During validation (`at_once()`: it can take minutes, longer than the warning) and for a second signal of the same
kind, the signal acts at once; the trainer writes last.pt before each validation, so only the validation is redone.

SIGTERM is caught only in a lone process: a DDP worker is sent SIGTERM by its launcher when another rank has failed,
and may then be blocked in a collective, where a Python handler never runs; the default action ends it at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)

PREEMPTION_WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)


class StoppedBySignal(KeyboardInterrupt):
    """Training stopped for a signal after writing last.pt; `str()` is the signal's name (run.main reports it)."""


class StopSignals:
    """Installs the handlers while `with`-entered (main thread only) and defers the signals, except `at_once()`."""

    def __init__(self, catch_sigterm: bool):
        self.signals = PREEMPTION_WARNINGS + ((signal.SIGTERM,) if catch_sigterm else ())
        self.previous: dict[int, object] = {}  # signal -> the handler it had before
        self.received: list[int] = []  # noted while deferring, not yet decided on by the step clock
        self.deferring = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers belong to the main thread; a trainer elsewhere leaves them alone
        for signum in self.signals:
            previous = signal.getsignal(signum)
            if previous in (signal.SIG_IGN, None):  # ignored on purpose, or set outside Python: leave it
                continue
            self.previous[signum] = previous
            signal.signal(signum, self._note)
        self.deferring = True
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.deferring = False
        pending = self.take()
        if pending and exc_type is None:  # noted after the last check (training ended): acted on now
            self._act(pending[0], None)
        self.previous = {}

    @contextmanager
    def at_once(self):
        deferring, self.deferring = self.deferring, False
        try:
            yield
        finally:
            self.deferring = deferring

    def _note(self, signum: int, frame) -> None:
        if self.deferring and signum not in self.received:
            log.warning("%s: stopping at the next step boundary to write last.pt", signal.Signals(signum).name)
            self.received.append(signum)
            return
        self._act(signum, frame)

    def _act(self, signum: int, frame) -> None:
        """What the signal did before this module: its earlier Python handler, or the end of the run."""
        previous = self.previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        raise StoppedBySignal(signal.Signals(signum).name)

    def take(self) -> tuple[int, ...]:
        """The signals noted since the last call: the step clock's check decides on them, `forward` acts on them."""
        received, self.received = tuple(self.received), []
        return received

    def ending(self, received: tuple[int, ...]) -> int:
        """The first of `received` whose default action ends the process (0 if none): it ends every rank."""
        return next((s for s in received if not callable(self.previous.get(s, signal.SIG_DFL))), 0)

    def forward(self, received: tuple[int, ...], ending: int) -> None:
        """After last.pt is written: call the earlier handlers of this rank's `received` signals (submitit requeues
        and exits in its own), then end the run if any rank got an `ending` signal."""
        for signum in received:
            if callable(self.previous.get(signum)):
                self.previous[signum](signum, None)
        if ending:
            raise StoppedBySignal(signal.Signals(ending).name)
