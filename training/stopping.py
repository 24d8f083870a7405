"""Ctrl-C during training: the update under way finishes, a checkpoint is saved, the command line says how to resume.

Torch-free: :class:`StopRequest` turns the first SIGINT into a request the loop reads at the end of each update (a
one-process run stops after the update under way; processes of a distributed run agree at the next ``--log-every``
point, where they already exchange the NaN flag); a second Ctrl-C stops at once, without a checkpoint.
"""

from __future__ import annotations

import shlex
import signal
import threading
import time


class TrainingInterrupted(Exception):
    """Ctrl-C stopped the run after ``update`` updates, saved in the ``checkpoint`` folder (None: nothing saved)."""

    def __init__(self, update: int, checkpoint: str | None):
        super().__init__(f"interrupted after update {update}")
        self.update, self.checkpoint = update, checkpoint


class StopRequest:
    """A context in which the first SIGINT sets :attr:`requested` (and says so with ``say``) instead of raising; a
    second one, ``grace`` seconds or more later, raises KeyboardInterrupt (a launcher that forwards the terminal's
    Ctrl-C to its workers delivers it twice at once: that counts as one). Outside the main thread it changes nothing."""

    def __init__(self, say=print, grace: float = 1.0):
        self.say, self.grace = say, grace
        self.requested, self._at, self._previous = False, 0.0, None

    def install(self) -> StopRequest:
        """Take SIGINT over, unless this is not the main thread or SIGINT is ignored (a background job, nohup)."""
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested, self._at = True, time.monotonic()
            self.say("\nCtrl-C: stopping after this update and saving a checkpoint (Ctrl-C again to stop at once, without one)")
        elif time.monotonic() - self._at >= self.grace:
            raise KeyboardInterrupt


def resume_command(argv: list[str], output_dir: str) -> str:
    """The ``onestep-train`` command line ``argv`` (``distill ...``) that continues the run in ``output_dir``: its
    flags, with ``--output-dir`` named and ``--resume latest``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--output-dir", "--resume"):
            skip = True
        elif not arg.startswith(("--output-dir=", "--resume=")):
            kept.append(arg)
    return "onestep-train " + shlex.join([*kept, "--output-dir", output_dir, "--resume", "latest"])
