"""Evaluation of preference tasks: does the model prefer the chosen response of held-out pairs?

Pairs are featurized and packed exactly as in training (flan_jax.data.converters.pairs: both
halves in one row, the prompt cut from the left when too long), batched in fixed shapes, and each
response is scored by what the evaluated model has:

  a reward model (a `score` head)   its score r at the response's last token
  a policy with a reference model   the DPO implicit reward: log pi(y|x) - log pi_ref(y|x)
  any language model                its log-probability of the response (sum over tokens, EOS
                                    included; the mean per token with eval.length_normalized_options)

Metrics per task (percentages like every accuracy in flan_jax.eval):

  pair_accuracy      % of pairs whose chosen response scores higher (the score above)
  pair_margin        mean score(chosen) - score(rejected)
  logprob_accuracy   % of pairs whose chosen response is more likely under the model (always, so
                     an untrained, an SFT and a DPO model can be compared on one scale)

Pairs dropped as over-long (their responses do not fit in `data.seq_len`) are counted in
`pairs_dropped` and left out of the averages, never silently.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flan_jax.data.converters.pairs import PAIRS, build_pair_row
from flan_jax.data.features import FeatureConfig
from flan_jax.train import pairs as pairs_lib

PREFERENCE_METRICS = ("pair_accuracy", "pair_margin", "logprob_accuracy")
SCORE_HEAD = "score"


def has_score_head(model: nnx.Module) -> bool:
    heads = getattr(model, "scalar_heads", None)
    return heads is not None and SCORE_HEAD in heads


@functools.partial(jax.jit, static_argnums=(0, 2))
def _per_response(graphdef, state, want_scores: bool, batch):
    model = nnx.merge(graphdef, state)
    inputs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    if hasattr(model, "hidden_states"):
        hidden, head = model.hidden_states(batch["input_tokens"], **inputs)
        logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
    else:  # any LM with the design.md §5 call signature
        logits = model(batch["input_tokens"], **inputs)
    logps = pairs_lib.response_log_probs(logits, batch)
    lengths = pairs_lib.response_lengths(batch)
    out = {"logp_chosen": logps.chosen, "logp_rejected": logps.rejected, "len_chosen": lengths.chosen, "len_rejected": lengths.rejected}
    if want_scores:
        scores = model.scalar_head(SCORE_HEAD, hidden)
        sums = pairs_lib.response_sums(jnp.where(pairs_lib.last_response_positions(batch), scores, 0.0), batch)
        out.update(score_chosen=sums.chosen, score_rejected=sums.rejected)
    return out


def _pack(features: Sequence[dict | None], seq_len: int) -> tuple[list[dict], list[tuple[int, int] | None]]:
    """Pairs in order, as many per row as fit; (row, pair column) of each (None for dropped pairs)."""
    rows: list[list[dict]] = []
    used = seq_len
    where: list[tuple[int, int] | None] = []
    for f in features:
        if f is None:
            where.append(None)
            continue
        n = len(f["input_tokens"])
        if used + n > seq_len:
            rows.append([])
            used = 0
        where.append((len(rows) - 1, len(rows[-1])))
        rows[-1].append(f)
        used += n
    return [build_pair_row(r, seq_len) for r in rows], where


def score_pairs(model: nnx.Module, tokenizer, examples: Sequence[dict], *, seq_len: int, batch_rows: int) -> list[dict | None]:
    """Per example: log-probs and lengths of both responses (and reward scores with a score head); None if dropped."""
    config = FeatureConfig(seq_len=seq_len)
    features = [PAIRS.featurize(ex, tokenizer, config)[0] for ex in examples]
    rows, where = _pack(features, seq_len)
    graphdef, state = nnx.split(model)
    want_scores = has_score_head(model)
    results: dict[str, np.ndarray] = {}
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        chunk += [build_pair_row([], seq_len)] * (batch_rows - len(chunk))  # one shape: one compile
        batch = {k: jnp.asarray(np.stack([r[k] for r in chunk])) for k in chunk[0]}
        out = jax.device_get(_per_response(graphdef, state, want_scores, batch))
        for k, v in out.items():
            results.setdefault(k, []).append(np.asarray(v)[: len(rows) - start])
    stacked = {k: np.concatenate(v) for k, v in results.items()}
    return [None if w is None else {k: float(v[w]) for k, v in stacked.items()} for w in where]


def pair_metrics(
    policy: Sequence[dict | None],
    reference: Sequence[dict | None] | None = None,
    *,
    length_normalized: bool = False,
    beta: float = 1.0,
) -> dict[str, float]:
    """The task's preference metrics from `score_pairs` results (and a reference's, for implicit rewards)."""
    kept = [i for i, p in enumerate(policy) if p is not None]
    out = {"pairs_dropped": float(len(policy) - len(kept))}
    if not kept:
        return out

    def logp(r: dict, side: str) -> float:
        return r[f"logp_{side}"] / max(r[f"len_{side}"], 1.0) if length_normalized else r[f"logp_{side}"]

    def score(i: int, side: str) -> float:
        p = policy[i]
        if "score_chosen" in p:
            return p[f"score_{side}"]
        if reference is not None:
            return beta * (p[f"logp_{side}"] - reference[i][f"logp_{side}"])
        return logp(p, side)

    margins = [score(i, "chosen") - score(i, "rejected") for i in kept]
    out["pair_accuracy"] = 100.0 * float(np.mean([m > 0 for m in margins]))
    out["pair_margin"] = float(np.mean(margins))
    out["logprob_accuracy"] = 100.0 * float(np.mean([logp(policy[i], "chosen") > logp(policy[i], "rejected") for i in kept]))
    return out


def evaluate_preference_tasks(
    model: nnx.Module,
    tokenizer,
    task_examples: Sequence[Sequence[dict]],
    *,
    seq_len: int,
    batch_rows: int,
    reference: nnx.Module | Callable[[], nnx.Module] | None = None,
    length_normalized: bool = False,
    beta: float = 1.0,
) -> list[dict[str, float]]:
    """Metrics of several preference tasks, all pairs scored in one packed pass (plus one for the reference)."""
    flat = [ex for examples in task_examples for ex in examples]
    policy = score_pairs(model, tokenizer, flat, seq_len=seq_len, batch_rows=batch_rows)
    ref = None
    if reference is not None and not has_score_head(model):
        reference_model = reference() if callable(reference) and not isinstance(reference, nnx.Module) else reference
        ref = score_pairs(reference_model, tokenizer, flat, seq_len=seq_len, batch_rows=batch_rows)
    out, start = [], 0
    for examples in task_examples:
        stop = start + len(examples)
        out.append(pair_metrics(policy[start:stop], None if ref is None else ref[start:stop],
                                length_normalized=length_normalized, beta=beta))
        start = stop
    return out


def load_reference_model(run_config) -> nnx.Module:
    """The initial policy of a DPO-family run (its checkpoint.init_from, or the seed's init), on one device."""
    from flan_jax.train import loop, partitioning

    mesh = jax.make_mesh((1, 1, 1), partitioning.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.local_devices()[:1])
    rules = partitioning.axis_rules(run_config.mesh)
    model_cfg, parts = loop.build_model(run_config, mesh, rules)
    with jax.set_mesh(mesh):
        return parts.merge(loop.initial_params(run_config, parts, mesh, model_cfg))


def is_preference_task(task: Any) -> bool:
    from flan_jax.data.preference import PreferenceTask

    return isinstance(task, PreferenceTask)


__all__ = ["PREFERENCE_METRICS", "evaluate_preference_tasks", "pair_metrics", "score_pairs"]
