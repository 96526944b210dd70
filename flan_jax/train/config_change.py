"""What a resumed run may change in its config, compared with the config stored in the checkpoint.

Re-running the training command on a workdir continues the run in the checkpoint, whose config is
saved with it. Every field that differs is logged, and each falls in one of three kinds:

  free          how the run is executed or observed, not what it computes: logging, progress,
                checkpoint cadence and retention, evaluation, mesh and multi-host settings, the
                model's remat / attention / kernels (same model, other kernels), scan_layers
                (same parameters in the other layout, converted on restore) and init_std;
  meaning       fields that change what the run computes from here on (learning rate, schedule,
                warmup, number of steps (the schedule's length), gradient accumulation, optimizer,
                loss, compute and parameter dtypes, non-finite policy, data rendering switches):
                refused unless `--config.train.allow_config_change=True`, then logged and recorded
                in metrics.jsonl (`config_changes` of the first record after the resume);
  incompatible  fields the checkpoint cannot continue under at all: the model's architecture,
                LoRA's rank and targets, the trainable-parameter filter, the objective and where its
                reference log-probs come from, batch size, row length, an RL run's group size,
                completion length, updates per rollout and PPO-ptx stream,
                packing, data workers, mixture, tokenizer and seed (the data iterator's position
                and the parameters' shapes belong to them). Refused
                always: start a new workdir (`checkpoint.init_from` takes converted weights).

A field the checkpoint's config lacks (it was written by an older flan_jax) counts as unchanged
when the current value is that field's default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flan_jax.train.exit_codes import ConfigMismatchError

FREE = (
    "train.log_every", "train.progress_bar", "train.peak_flops_per_device", "train.allow_config_change",
    "checkpoint.", "eval.", "mesh.", "distributed.", "data.task_modules",
    "model.remat", "model.attention", "model.kernels",
    # The layer layout: the restore converts params and optimizer state (train/checkpointing.py).
    "model.scan_layers",
    # Only the initialisation reads it, which a resume does not redo (frozen slots rebuilt from it
    # are checked by their fingerprints, train/state.py).
    "model.init_std",
    "lora.init_from",  # the adapters' starting point: the checkpoint holds where they are now
    "rl.reward_model_batch_size",  # how many completions one reward-model pass scores
)
INCOMPATIBLE = (
    "seed", "data.batch_size", "data.seq_len", "data.pack", "data.worker_count", "data.num_packing_bins",
    "data.train_mixture", "data.train_split", "data.tokenizer.",
    # Which parameters exist and are trained, and the frozen base's dtype (docs/lora.md).
    "lora.rank", "lora.targets", "trainable.",
    # The objective: its heads (a reward model's score), batch layout (pairs) and frozen slots;
    # where DPO's reference log-probs come from (a cache feature, a frozen slot, or the policy
    # with its adapters switched off) decides the state's slots and the batch's features.
    "objective.name", "objective.reference",
    # Online RL (flan_jax/rl): the prompt stream's shape and position (prompts per step, the prompt
    # budget, what happens to long prompts), how many updates a checkpointed step holds (the
    # optimizer step counter is RL step x epochs x minibatches), and PPO-ptx's second data stream.
    # Every other rl.* field (rewards, sampling temperature, clipping, KL coefficient) is "meaning";
    # a change of reward model is also checked by its parameters' fingerprint.
    "rl.group_size", "rl.max_new_tokens", "rl.on_long_prompt", "rl.epochs", "rl.minibatches",
    "rl.ptx_coef", "rl.ptx_mixture", "rl.ptx_batch_size",
)
# Model fields that describe how to run it, not the architecture (config.RUNTIME_FIELDS minus
# the dtypes, which change the numbers the run computes).
_MODEL_MEANING = ("model.dtype", "model.param_dtype")

_MISSING = object()


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer.learning_rate": 1e-3, ...} from a nested config dict (lists compared as tuples)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _matches(field: str, patterns: tuple[str, ...]) -> bool:
    """A pattern ending in "." is a section prefix; any other names one field."""
    return any(field.startswith(p) if p.endswith(".") else field == p for p in patterns)


def kind(field: str) -> str:
    """"free", "meaning" or "incompatible" (see the module docstring)."""
    if _matches(field, FREE):
        return "free"
    if _matches(field, INCOMPATIBLE):
        return "incompatible"
    if field.startswith("model.") and field not in _MODEL_MEANING:
        return "incompatible"  # the architecture: parameter shapes and what they mean
    return "meaning"


def differences(saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, tuple]:
    """{field: (saved value, current value)} over the flattened configs."""
    saved, current, defaults = flatten(saved), flatten(current), flatten(defaults)
    out = {}
    for field in sorted(set(saved) | set(current)):
        old, new = saved.get(field, _MISSING), current.get(field, _MISSING)
        if old is _MISSING and new == defaults.get(field, _MISSING):
            continue  # a field newer than the checkpoint, at its default
        if old != new:
            out[field] = (None if old is _MISSING else old, None if new is _MISSING else new)
    return out


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any], *,
                 allow: bool, checkpoint: str) -> dict[str, list]:
    """Logs every difference; raises ConfigMismatchError where the resume is not allowed.

    Returns the meaning-changing differences that were allowed, {field: [saved, current]}, for
    metrics.jsonl.
    """
    diffs = differences(saved, current, defaults)
    by_kind: dict[str, dict[str, tuple]] = {"free": {}, "meaning": {}, "incompatible": {}}
    for field, change in diffs.items():
        by_kind[kind(field)][field] = change
    for field, (old, new) in diffs.items():
        level = logging.INFO if kind(field) == "free" else logging.WARNING
        logging.log(level, "Resume from %s: config.%s changed %r -> %r (%s)", checkpoint, field, old, new, kind(field))
    if by_kind["incompatible"]:
        raise ConfigMismatchError(
            f"Cannot resume {checkpoint} with this config: {_listing(by_kind['incompatible'])} differ from the "
            "checkpoint's, and the run cannot continue under them (parameter shapes or the data stream depend on "
            "them). Use the checkpoint's values, or start a new --workdir (checkpoint.init_from takes converted weights)."
        )
    if by_kind["meaning"] and not allow:
        raise ConfigMismatchError(
            f"Resuming {checkpoint} with a changed config: {_listing(by_kind['meaning'])}. These change what the "
            "run computes from here on; pass --config.train.allow_config_change=True to continue with them "
            "(they are then recorded in metrics.jsonl), or use the checkpoint's values."
        )
    return {field: [old, new] for field, (old, new) in by_kind["meaning"].items()}


def _listing(changes: Mapping[str, tuple]) -> str:
    return ", ".join(f"config.{field} ({old!r} -> {new!r})" for field, (old, new) in changes.items())
