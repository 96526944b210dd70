"""Evaluation of preference tasks: pair accuracy by log-probs (by hand, bigram model), implicit rewards, reward scores."""

from __future__ import annotations

import numpy as np
import pytest
from eval_fakes import BOS, EOS, BigramModel, CharTokenizer, bigram_log_likelihood
from flax import nnx

import flan_jax_tasks  # noqa: F401  (registers the built-in tasks and pairs)
from flan_jax import data, default_config
from flan_jax import model as fm
from flan_jax.eval import evaluator

PAIRS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "sky?", "chosen": "blue", "rejected": "green"},
    {"prompt": "cat says", "chosen": " meow", "rejected": " woof"},
    {"prompt": "x", "chosen": "a" * 200, "rejected": "b"},  # does not fit in the row: dropped, counted
]


@pytest.fixture
def task():
    task = data.register_task(data.PreferenceTask("test_pairs_eval", data.InMemorySource({"validation": PAIRS})), replace=True)
    yield task
    data.unregister(task.name)


def _config(**eval_overrides):
    config = default_config.get_config()
    config.data.seq_len = 64
    config.eval.mixtures = ("test_pairs_eval",)
    config.eval.batch_size = 4
    config.eval.update(eval_overrides)
    return config


def _by_hand(table, tokenizer, normalized=False):
    chosen, rejected = [], []
    for pair in PAIRS[:3]:
        prompt = [BOS, *tokenizer.encode(pair["prompt"])]
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            target = [*tokenizer.encode(pair[side]), EOS]
            value = bigram_log_likelihood(table, prompt, target)
            out.append(value / len(target) if normalized else value)
    return np.array(chosen), np.array(rejected)


@pytest.mark.parametrize("normalized", [False, True])
def test_pair_accuracy_of_a_language_model_is_its_log_prob_preference(task, normalized):
    tokenizer = CharTokenizer()
    table = np.random.default_rng(1).normal(0, 2.0, (tokenizer.vocab_size, tokenizer.vocab_size))
    results = evaluator.evaluate(BigramModel(table), tokenizer, _config(length_normalized_options=normalized), workdir=None, step=0)
    metrics = results["tasks"]["test_pairs_eval"]["metrics"]
    chosen, rejected = _by_hand(table, tokenizer, normalized)
    assert metrics["pairs_dropped"] == 1
    assert metrics["pair_accuracy"] == pytest.approx(100 * np.mean(chosen > rejected))
    assert metrics["pair_margin"] == pytest.approx(np.mean(chosen - rejected), rel=1e-5, abs=1e-5)
    assert metrics["logprob_accuracy"] == metrics["pair_accuracy"]
    assert 0 < metrics["pair_accuracy"] < 100  # the table prefers some chosen and some rejected responses


def test_implicit_rewards_against_a_reference(task):
    tokenizer = CharTokenizer()
    rng = np.random.default_rng(5)
    policy, reference = (rng.normal(0, 2.0, (tokenizer.vocab_size,) * 2) for _ in range(2))
    config = _config()
    config.objective.beta = 0.5
    metrics = evaluator.evaluate(BigramModel(policy), tokenizer, config, workdir=None, step=0,
                                 reference=lambda: BigramModel(reference))["tasks"]["test_pairs_eval"]["metrics"]
    pc, pr = _by_hand(policy, tokenizer)
    rc, rr = _by_hand(reference, tokenizer)
    margins = 0.5 * ((pc - rc) - (pr - rr))
    assert metrics["pair_accuracy"] == pytest.approx(100 * np.mean(margins > 0))
    assert metrics["pair_margin"] == pytest.approx(np.mean(margins), rel=1e-5, abs=1e-5)
    assert metrics["logprob_accuracy"] == pytest.approx(100 * np.mean(pc > pr))
    same = evaluator.evaluate(BigramModel(policy), tokenizer, config, workdir=None, step=0, reference=BigramModel(policy))
    assert same["tasks"]["test_pairs_eval"]["metrics"]["pair_margin"] == 0.0  # the policy is its own reference


def test_a_reward_model_is_scored_by_its_score_head(task):
    import jax.numpy as jnp

    from flan_jax.data.converters.pairs import PAIRS as CONVERTER
    from flan_jax.data.converters.pairs import build_pair_row
    from flan_jax.data.features import FeatureConfig
    from flan_jax.train.objectives import reward

    tokenizer = CharTokenizer()
    cfg = fm.ModelConfig.for_family("llama", vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                    n_kv_heads=1, head_dim=8, d_ff=32, max_positions=64, init_std=0.5)
    model = fm.Transformer(cfg, rngs=nnx.Rngs(1), heads=("score",))
    metrics = evaluator.evaluate(model, tokenizer, _config(), workdir=None, step=0)["tasks"]["test_pairs_eval"]["metrics"]
    rows = []
    for pair in PAIRS[:3]:  # one pair per row, scored by the training objective's own function
        example = {"inputs": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
        rows.append(build_pair_row([CONVERTER.featurize(example, tokenizer, FeatureConfig(seq_len=64))[0]], 64))
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    scores = nnx.jit(lambda m, b: reward.response_scores(m, b, dict(positions=b["positions"], segment_ids=b["segment_ids"])))(model, batch)
    expected = np.asarray(scores.chosen[:, 0] - scores.rejected[:, 0])
    assert metrics["pair_margin"] == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-5)
    assert metrics["pair_accuracy"] == pytest.approx(100 * np.mean(expected > 0))
