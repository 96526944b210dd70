"""The Optax optimizer of a run: schedule, clipping, AdamW or Adafactor, weight-decay mask.

Everything is built from `config.optimizer` with stock optax pieces so a reader can check the
exact update rule in optax's documentation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax


def make_schedule(opt_config: Any, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine / linear decay or a constant rate.

    Decays end at `end_learning_rate_fraction * peak` on the last step of the run.
    """
    peak = float(opt_config.learning_rate)
    warmup = int(opt_config.warmup_steps)
    end = peak * float(opt_config.end_learning_rate_fraction)
    decay_steps = max(int(num_steps) - warmup, 1)
    kind = opt_config.schedule
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"config.optimizer.schedule={kind!r}: expected 'cosine', 'linear' or 'constant'")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def param_path(path: Sequence[Any]) -> str:
    """'layers/0/attention/q/kernel' for a key path of a pure-dict params tree."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def decay_mask(params: Any, no_decay_patterns: Sequence[str]) -> Any:
    """True where weight decay applies: parameters whose path matches none of the patterns.

    Defaults exclude norms, biases and embeddings, the usual choice for LLM pre/fine-tuning.
    """
    compiled = [re.compile(p) for p in no_decay_patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(param_path(path)) for p in compiled), params
    )


def make_optimizer(opt_config: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) from `config.optimizer`."""
    schedule = make_schedule(opt_config, num_steps)
    patterns = tuple(opt_config.no_decay_patterns)
    mask = lambda params: decay_mask(params, patterns)  # noqa: E731 (optax calls it on the params)
    name = opt_config.name
    if name == "adamw":
        core = optax.adamw(
            schedule,
            b1=opt_config.b1,
            b2=opt_config.b2,
            eps=opt_config.eps,
            weight_decay=opt_config.weight_decay,
            mask=mask,
        )
    elif name == "adafactor":
        core = optax.adafactor(
            schedule,
            weight_decay_rate=opt_config.weight_decay or None,
            weight_decay_mask=mask,
        )
    else:
        raise ValueError(f"config.optimizer.name={name!r}: expected 'adamw' or 'adafactor'")
    parts = []
    if opt_config.clip_norm:
        parts.append(optax.clip_by_global_norm(opt_config.clip_norm))
    parts.append(core)
    return optax.chain(*parts), schedule
