"""What a run reports: metrics.jsonl, TensorBoard events, a console progress bar, and the MFU estimate.

FLOPs per token (training = forward + backward = 3 x forward; PaLM, Chowdhery et al. 2022, App. B):

    flops_per_token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

  N_matmul  parameters that take part in a matrix multiply: every parameter of rank >= 2 except
            lookup tables (token and learned position embeddings); a scanned model's stacked
            parameters are judged by one layer's rank; a tied output head counts its
            embedding matrix once. Each such weight costs 2 FLOPs per token forward, 4 backward.
  second    attention scores Q.K^T and the weighted sum of V: 2 * 2 * n_heads * head_dim * seq_len
  term      FLOPs per token forward per layer, x3 for training. The whole L x L score matrix is
            counted even though causal/packed masks use about half of it (the usual convention).

MFU = flops_per_token * tokens_per_sec / peak FLOP/s, with tokens = all batch_size x seq_len
positions (padding included: that is what the hardware computes). The peak is
`config.train.peak_flops_per_device` x devices when set, a table of known accelerators
otherwise, and on CPU a dense matmul in the model's compute dtype measured once at start (bf16
operands accumulating in float32, as the model computes, run ~2x float32 on CPUs with avx512_bf16;
all simulated CPU devices share the same cores, so the host is measured once, not per device).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from flan_jax import atomic_write

# Dense bf16 peak FLOP/s per chip for common accelerators (vendor numbers, no sparsity).
_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}
_LOOKUP_AXES = ("vocab", "positions")
# Metrics every train step reports (train/step.py); anything else comes from the objective.
_STEP_METRICS = ("loss", "learning_rate", "grad_norm", "skipped_steps", "first_nonfinite_step")


def matmul_param_count(abstract_params: Any, logical_axes: Any, *, tied_embeddings: bool) -> int:
    """N_matmul of the module docstring, from parameter shapes and their logical axes."""
    total = 0
    shapes = jax.tree.leaves(abstract_params)
    axes = jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, tuple))
    for shape_holder, names in zip(shapes, axes):
        shape = shape_holder.shape
        size = int(np.prod(shape))
        if names and names[0] == "layers":  # a scanned model's stack: judge one layer's shape
            shape, names = shape[1:], names[1:]
        if len(shape) < 2:
            continue
        if names and names[0] in _LOOKUP_AXES:  # a lookup table: gathers, no matmul
            if tied_embeddings and names[0] == "vocab":
                total += size
            continue
        total += size
    return total


def flops_per_token(model_config: Any, n_matmul: int, seq_len: int, n_frozen_matmul: int = 0) -> float:
    """`n_frozen_matmul`: matmul weights the run does not train (LoRA's base): no weight gradient,
    so 2 FLOPs forward + 2 for the input gradient."""
    attention = 12 * model_config.n_layers * model_config.n_heads * model_config.head_dim * seq_len
    return float(6 * n_matmul + 4 * n_frozen_matmul + attention)


def measure_matmul_flops(size: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """Dense matmul FLOP/s on the default device (operands in `dtype`, float32 accumulation).

    The practical ceiling on CPU for a model computing in `dtype`.
    """
    a = jnp.ones((size, size), jnp.dtype(dtype))
    matmul = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(configured_per_device: float, compute_dtype: str = "float32") -> float | None:
    """Peak FLOP/s of all devices of the run (None if unknown: MFU is then not reported)."""
    devices = jax.devices()
    if configured_per_device > 0:
        return configured_per_device * len(devices)
    if configured_per_device < 0:
        return None
    kind = devices[0].device_kind
    for name, value in _PEAK_FLOPS.items():
        if kind.startswith(name):
            return value * len(devices)
    if devices[0].platform == "cpu":
        return measure_matmul_flops(dtype=compute_dtype)
    return None


def truncate_jsonl(path: epath.Path, last_step: int) -> None:
    """Drops entries logged after `last_step` (a run resumed from it will log them again).

    The file is replaced atomically (atomic_write): a kill during the rewrite of a long history
    leaves the old file, never a truncated one.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            # A line cut by a crash mid-write: it is past every complete entry, so it goes.
            logging.warning("Dropping an unreadable metrics.jsonl line: %r", line[:200])
    atomic_write.write_text(path, "".join(line + "\n" for line in kept))


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars; process 0 only."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = epath.Path(workdir) / "metrics.jsonl"
        truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self._tb = _summary_writer_class()(os.fspath(epath.Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        # Strict JSON: a NaN/inf is written as null (skipped_steps counts the step in "skip" mode).
        self._file.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch (several seconds) only to recognise torch tensors; we log Python
    floats. When torch is not loaded yet it is hidden during the import, then made importable again.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  (makes `import torch` raise ImportError)
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _finite_or_null(value: Any) -> Any:
    """`value` with every NaN/inf float replaced by None, in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """Python scalars (json.dumps writes floats with full precision: the shortest exact repr)."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        value = np.asarray(value).item()
    return value


class Progress:
    """A tqdm bar (step, loss, lr, tokens/s, MFU, ETA) or, without a bar, a log line per log step."""

    def __init__(self, total: int, initial: int, *, bar: bool, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        if enabled and bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._last = initial
        self._total = total
        self._clock: tuple[int, float] | None = None  # (step, time) of the first update: the ETA's origin

    def update(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        shown = {
            "loss": f"{values['loss']:.4f}",
            "lr": f"{values['learning_rate']:.2e}",
        }
        if values.get("tokens_per_sec") is not None:
            shown["tok/s"] = f"{values['tokens_per_sec']:,.0f}"
        if values.get("mfu") is not None:
            shown["mfu"] = f"{100 * values['mfu']:.1f}%"
        if values.get("skipped_steps"):
            shown["skipped"] = str(values["skipped_steps"])
        if self._bar is not None:  # tqdm shows its own ETA
            self._bar.update(step - self._last)
            self._bar.set_postfix(shown, refresh=True)
        else:
            now = time.perf_counter()
            if self._clock is None:
                self._clock = (step, now)  # from here on: the first step's compilation is behind
            elif step > self._clock[0]:
                seconds = (now - self._clock[1]) / (step - self._clock[0]) * (self._total - step)
                shown["eta"] = f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"
            logging.info("step %d/%d: %s", step, self._total, ", ".join(f"{k}={v}" for k, v in shown.items()))
        self._last = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Reporter:
    """Turns the step's device metrics into one logged record, written everywhere it goes.

    Owns the throughput timer: tokens/s covers training steps only (the timer restarts after the
    compiling first step and after evaluation / checkpoint hooks), and is None when no timed step
    lies behind it.
    """

    def __init__(self, workdir, config: Any, flops_per_token_: float, *, start_step: int, enabled: bool):
        self.tokens_per_step = int(config.data.batch_size) * int(config.data.seq_len)
        self.flops_per_token = flops_per_token_
        self.peak = peak_flops(float(config.train.peak_flops_per_device), str(config.model.dtype))
        self.writer = MetricsWriter(workdir, resume_step=start_step, enabled=enabled)
        self.progress = Progress(int(config.train.num_steps), start_step, bar=config.train.progress_bar, enabled=enabled)
        self._timer_step, self._timer_start = start_step, None

    def restart_timer(self, step: int, wait_for: Any) -> None:
        jax.block_until_ready(wait_for)
        self._timer_step, self._timer_start = step, time.perf_counter()

    def log(self, step: int, values: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Writes one metrics.jsonl record; `extra` adds fields (e.g. the data pipeline's counts)."""
        timed_steps = step - self._timer_step
        tokens_per_sec = None
        if self._timer_start is not None and timed_steps > 0:
            tokens_per_sec = timed_steps * self.tokens_per_step / (time.perf_counter() - self._timer_start)
        record = {
            "loss": float(values["loss"]),
            "learning_rate": float(values["learning_rate"]),
            "grad_norm": float(values["grad_norm"]),
            "tokens_per_sec": tokens_per_sec,
            "mfu": self.flops_per_token * tokens_per_sec / self.peak if self.peak and tokens_per_sec else None,
            "skipped_steps": int(values["skipped_steps"]),
            # The objective's own metrics (SFT: loss_weight_sum; DPO: rewards, accuracy, ...).
            **{k: float(v) for k, v in values.items() if k not in _STEP_METRICS},
            **(extra or {}),
        }
        self.writer.write(step, record)
        self.progress.update(step, record)
        self._timer_step, self._timer_start = step, time.perf_counter()
        return record

    def close(self) -> None:
        self.writer.close()
        self.progress.close()
