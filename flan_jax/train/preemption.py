"""SIGTERM (preemption) as a request to checkpoint and exit 0 at the next step boundary.

Kept free of a jax import at module level, so a launcher can install the early handler
(`install_early_sigterm_handler`) before its slow imports: a SIGTERM that arrives during
start-up is then honoured as well, instead of killing the process with status -15.
"""

from __future__ import annotations

import logging
import signal

import numpy as np

# A SIGTERM that arrives while the command line is still importing (before train() runs): the
# launcher installs this handler first (`install_early_sigterm_handler`), train() takes it over.
_EARLY_SIGTERM = {"installed": False, "requested": False, "previous": None}


def install_early_sigterm_handler() -> None:
    """For launchers: record a SIGTERM from process start on (train() honours it once it runs)."""
    def handle(signum, frame):
        del signum, frame
        _EARLY_SIGTERM["requested"] = True

    _EARLY_SIGTERM["previous"] = signal.signal(signal.SIGTERM, handle)
    _EARLY_SIGTERM["installed"] = True


class PreemptionWatcher:
    """Turns SIGTERM into a request to checkpoint and exit cleanly at the next step boundary.

    Installed first thing in train(), before the (possibly long) restore and compile; a request
    that arrives before the first step ends the run right there (the restored checkpoint already
    holds the state). With several processes the flag is agreed on at log steps (an
    all-gather), so every process saves at the same step.
    """

    def __init__(self):
        self._flag = bool(_EARLY_SIGTERM["requested"])
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a notebook worker)
            logging.warning("SIGTERM handler not installed (not on the main thread)")
        if _EARLY_SIGTERM["installed"] and self._previous is not None:
            self._previous = _EARLY_SIGTERM["previous"]  # close() restores what was there before the launcher
            _EARLY_SIGTERM.update(installed=False, requested=False, previous=None)

    def reinstall(self) -> None:
        """Takes SIGTERM back after something replaced the handler (jax.distributed's preemption notifier)."""
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:
            pass

    def close(self) -> None:
        """Restores the previous handler (train() may run inside a longer-lived process)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def requested_before_start(self, start_step: int) -> bool:
        """A SIGTERM during start-up (one process): exit before the first step, nothing new to save."""
        import jax

        if jax.process_count() > 1 or not self._flag:
            return False
        where = f"checkpoint step {start_step} holds the run's state" if start_step else "no step has run yet"
        logging.warning("SIGTERM received during start-up: exiting before the first step (%s)", where)
        return True

    def requested(self, step: int, every: int) -> bool:
        import jax

        if jax.process_count() == 1:
            return self._flag
        if step % every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self._flag))))
