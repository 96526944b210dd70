"""When a non-finite loss or gradient ends the run: `train.on_nonfinite` and the skip limits.

The jitted step never applies a non-finite update (step.py) and counts them in the state; this
module decides on the host, at log and checkpoint boundaries, whether the run goes on:

  "stop"  the first non-finite step ends the run (updates after it are frozen inside the step,
          and no checkpoint is written after it);
  "skip"  the update is skipped and counted, up to `train.max_consecutive_skips` skipped steps
          in a row and `train.max_skipped_steps` in all (0: no limit); past either the run stops
          like "stop" does. Unbounded skipping let a diverged run "finish" with 38 of 40 updates
          skipped and exit 0.

No per-step host sync: `record` keeps each step's cumulative skip count (a device scalar, not yet
computed) and `check` reads them all at once, so consecutive skips are counted exactly even
between log steps. The consecutive count restarts with the process (a resume starts at 0); the
total is part of the checkpointed state.

The stop message names the last checkpoint whose checksums verify, or says there is none.
"""

from __future__ import annotations

from typing import Any

import jax

from flan_jax.train.exit_codes import NonFiniteError


class NonfiniteGuard:
    def __init__(self, train_config: Any, *, skipped_before: int):
        self.mode = train_config.on_nonfinite
        self.max_consecutive = int(train_config.get("max_consecutive_skips", 0))
        self.max_total = int(train_config.get("max_skipped_steps", 0))
        self._skipped = int(skipped_before)
        self._streak = 0
        self._longest = 0
        self._pending: list[Any] = []  # device scalars: the cumulative skip count after each step
        self._last_metrics: dict | None = None

    def record(self, step_metrics: dict) -> None:
        """After every step (no sync: the values are read by `check`)."""
        self._pending.append(step_metrics["skipped_steps"])
        self._last_metrics = step_metrics

    def check(self, checkpoints: Any) -> None:
        """Raises NonFiniteError when the run must stop (see the module docstring)."""
        if self._last_metrics is None:
            return
        counts = [int(c) for c in jax.device_get(self._pending)]
        self._pending = []
        for count in counts:
            self._streak = self._streak + 1 if count > self._skipped else 0
            self._longest = max(self._longest, self._streak)
            self._skipped = count
        first_bad = int(jax.device_get(self._last_metrics["first_nonfinite_step"]))
        if first_bad < 0:
            return
        if self.mode == "stop":
            reason = f"Non-finite loss or gradients at step {first_bad}; stopping (config.train.on_nonfinite='stop')."
            hint = "Set config.train.on_nonfinite='skip' to skip such updates instead (bounded by train.max_consecutive_skips and train.max_skipped_steps)."
        else:
            over = []
            if self.max_consecutive and self._longest > self.max_consecutive:
                over.append(f"{self._longest} consecutive skipped updates (config.train.max_consecutive_skips={self.max_consecutive})")
            if self.max_total and self._skipped > self.max_total:
                over.append(f"{self._skipped} skipped updates in all (config.train.max_skipped_steps={self.max_total})")
            if not over:
                return
            reason = (f"Non-finite loss or gradients: {' and '.join(over)}, the first at step {first_bad}; stopping "
                      "(config.train.on_nonfinite='skip' is bounded).")
            hint = "Raise those limits (0: no limit) only if such skips are expected; otherwise lower the learning rate or check the data."
        raise NonFiniteError(f"{reason} {_last_good(checkpoints, first_bad)} {hint}")


def _last_good(checkpoints: Any, first_bad: int) -> str:
    checkpoints.wait()
    step = checkpoints.last_verified_step()
    if step is None:
        return (f"No checkpoint with verified checksums exists before step {first_bad}: a restart begins the run anew "
                f"(nothing to resume in {checkpoints.directory}).")
    return f"The last good checkpoint is step {step} (checksums verified) in {checkpoints.directory}; a restart resumes from it."
