"""RL runs through `flan_jax.train`: GRPO and PPO raise a reward, updates and rollouts share the params,
the reward model reward, PPO-ptx, bad rewards, tasks without a metric (8 simulated devices)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flan_jax import data, rl
from flan_jax.rl import loop as rl_loop
from flan_jax.train import checkpointing, loop
from tests import rl_fakes, train_fakes


def _config(tokenizer_path, objective="grpo", **overrides):
    return train_fakes.demo_config(rl_fakes.rl_overrides(tokenizer_path, objective, **overrides))


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _rises(records, key="reward", window=5, by=0.15):
    values = [r[key] for r in records]
    return np.mean(values[-window:]) > np.mean(values[:window]) + by


def test_grpo_raises_the_reward_and_logs_what_it_did(tmp_path, tokenizer_path, cache_dir):
    config = _config(tokenizer_path, train__num_steps=30, checkpoint__every_steps=30, rl__kl_coef=0.0)
    logged = loop.train(config, tmp_path)
    records = _records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert _rises(records), [r["reward"] for r in records]
    assert {"loss", "reward", "reward_std", "entropy", "clip_fraction", "ratio", "completion_length", "frac_no_eos",
            "frac_reward_zero_std", "rewards/rl_test_low_ids", "generation_seconds", "update_seconds",
            "generation_share", "rollout_tokens_per_sec", "prompts_read"} <= set(logged)
    assert "kl" not in logged  # kl_coef=0: no reference at all
    assert logged["prompts_read"] >= 30 * 4 and logged["completions"] == 16
    assert records[0]["ratio"] == pytest.approx(1.0, abs=1e-5)  # one update per rollout: on-policy
    # The policy that generated is the one the checkpoint holds (no copy of the weights is trained)
    _, saved_config, step = checkpointing.load_model(tmp_path)
    assert step == 30 and saved_config.objective.name == "grpo"


def test_ppo_with_a_value_head_raises_the_reward_and_mixes_in_sft_ptx(tmp_path, tokenizer_path, cache_dir):
    config = _config(tokenizer_path, "ppo", train__num_steps=30, checkpoint__every_steps=30, rl__ptx_coef=0.1,
                     rl__ptx_mixture="synthetic_train", rl__ptx_batch_size=8)
    logged = loop.train(config, tmp_path)
    records = _records(tmp_path)
    assert _rises(records), [r["reward"] for r in records]
    assert {"pg_loss", "vf_loss", "vf_clip_fraction", "approx_kl", "values", "kl_ref", "ptx_loss", "ptx_tokens"} <= set(logged)
    assert all(np.isfinite(r["ptx_loss"]) and r["ptx_loss"] > 0 for r in records)
    model, _, _ = checkpointing.load_model(tmp_path)
    assert "value" in model.scalar_heads  # the value head is trained and saved with the policy
    assert records[-1]["kl_ref"] != 0.0  # the policy moved away from the reference, penalised per token


def test_minibatches_and_epochs_take_several_off_policy_updates_per_rollout(tmp_path, tokenizer_path, cache_dir):
    config = _config(tokenizer_path, train__num_steps=3, rl__epochs=2, rl__minibatches=2, optimizer__warmup_steps=4,
                     optimizer__schedule="linear", optimizer__learning_rate=3e-2)
    loop.train(config, tmp_path)
    records = _records(tmp_path)
    # 4 updates per rollout: the schedule and the step counter count updates, the log counts rollouts
    assert records[0]["learning_rate"] == pytest.approx(3 * 3e-2 / 4)
    assert records[-1]["ratio"] != pytest.approx(1.0, abs=1e-6)  # later updates are off-policy
    assert records[0]["completions"] == config.data.batch_size  # the rollout's, not one minibatch's
    from flan_jax.train.checkpointing import Checkpointer

    meta = Checkpointer(tmp_path, config.checkpoint, read_only=True)
    assert meta.latest_step() == 3


def test_task_metric_rewards_and_bad_rewards_skipped_and_counted(tmp_path, tokenizer_path, cache_dir):
    calls = {"n": 0}

    @rl.register_reward("rl_test_sometimes_fails", replace=True)
    def sometimes_fails(completion: str, example: dict) -> float:
        calls["n"] += 1
        if calls["n"] % 5 == 0:
            raise RuntimeError("flaky judge")
        return 0.0 if calls["n"] % 7 == 0 else float("nan") if calls["n"] % 11 == 0 else 1.0

    config = _config(tokenizer_path, train__num_steps=3, rl__on_bad_reward="skip",
                     rl__rewards=("task_metric", "rl_test_sometimes_fails", "rl_test_low_ids"))
    logged = loop.train(config, tmp_path)
    records = _records(tmp_path)
    failed = sum(1 for n in range(1, 49) if n % 5 == 0 or (n % 7 and n % 11 == 0))
    assert logged["bad_rewards"] == failed == sum(r["bad_rewards_step"] for r in records)
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[0]["completions"] == 16 - sum(1 for n in range(1, 17) if n % 5 == 0 or (n % 7 and n % 11 == 0))
    assert "rewards/task_metric" in logged  # the synthetic tasks' exact match (an untrained model scores ~0)


def test_a_task_without_a_metric_or_a_bad_group_size_fails_before_any_rollout(tmp_path, tokenizer_path, cache_dir):
    task = data.Task("rl_test.unscored", data.InMemorySource({"train": [{"q": f"q{i}", "a": "a"} for i in range(8)]}),
                     [("{q}", "{a}")], metrics=())
    data.register_task(task, replace=True)
    try:
        with pytest.raises(ValueError, match="task 'rl_test.unscored' has no metric"):
            loop.train(_config(tokenizer_path, data__train_mixture="rl_test.unscored", rl__rewards=("task_metric",)), tmp_path / "a")
    finally:
        data.unregister("rl_test.unscored")
    with pytest.raises(ValueError, match="group_size=3 must divide config.data.batch_size=16"):
        loop.train(_config(tokenizer_path, rl__group_size=3), tmp_path / "b")
    assert not (tmp_path / "b" / "checkpoints").exists()


@pytest.fixture(scope="module")
def reward_model_workdir(tmp_path_factory, tokenizer_path, cache_dir):
    """A tiny reward model (issue-14 objective) trained 2 steps on the synthetic pairs."""
    workdir = tmp_path_factory.mktemp("rm")
    overrides = train_fakes.demo_overrides(tokenizer_path, objective__name="reward_model", data__train_mixture="synthetic_pairs_train",
                                           data__seq_len=96, data__batch_size=8, train__num_steps=2, model__max_positions=96)
    loop.train(train_fakes.demo_config(overrides), workdir)
    return workdir


def test_the_reward_model_reward_is_the_score_head_at_the_completions_last_token(reward_model_workdir, tokenizer_path):
    from flan_jax.rl.loop import Runtime
    from flan_jax.rl.rewards import Completion
    from flan_jax.train import partitioning

    config = _config(tokenizer_path, "ppo", rl__rewards=("reward_model",), rl__reward_model=str(reward_model_workdir),
                     rl__reward_model_batch_size=4)
    mesh = partitioning.make_mesh(config.mesh)
    reward = rl.rewards.RewardSet(config, Runtime(mesh, partitioning.axis_rules(config.mesh), None)).rewards["reward_model"]
    examples = [{"inputs": "What is 2 plus 3?", "task": "t"}, {"inputs": "Name a fruit.", "task": "t"}]
    items = [Completion(text=text, example=ex, prompt_tokens=[], tokens=[], ended=True)
             for ex in examples for text in ("5", "apple", "")]
    scores = reward(items)  # 6 completions in batches of 4 rows (8 devices: padded to 8)

    model, _, _ = checkpointing.load_model(reward_model_workdir)
    from flan_jax.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(tokenizer_path)  # the reward model run's tokenizer
    rows = [[tok.bos_id, *tok.encode(item.example["inputs"]), *tok.encode(item.text)] for item in items]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)  # right-padded: causal attention keeps each row's positions exact
    segments = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], segments[i, : len(r)] = r, 1
    hidden, _ = model.hidden_states(ids, positions=np.tile(np.arange(width), (len(rows), 1)), segment_ids=segments)
    head = np.asarray(model.scalar_head("score", hidden))
    expected = [float(head[i, len(r) - 1]) for i, r in enumerate(rows)]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(scores, 6))) > 1


def test_ppo_against_the_reward_model_runs_and_a_resume_refuses_another_reward_model(
    tmp_path, tokenizer_path, reward_model_workdir, cache_dir
):
    import shutil

    own_rm = tmp_path / "rm"
    shutil.copytree(reward_model_workdir, own_rm)
    config = _config(tokenizer_path, "ppo", train__num_steps=2, checkpoint__every_steps=1, rl__rewards=("reward_model",),
                     rl__reward_model=str(own_rm))
    run = tmp_path / "ppo"
    logged = loop.train(config, run)
    assert np.isfinite(logged["loss"]) and "rewards/reward_model" in logged
    saved = checkpointing.Checkpointer(run, config.checkpoint, read_only=True).frozen_fingerprints(2)
    assert set(saved) == {"reference", "reward:reward_model"}
    config.train.num_steps = 3
    # Another reward model by path: a change of what the run computes, refused unless allowed
    config.rl.reward_model = str(reward_model_workdir)
    with pytest.raises(loop.ConfigMismatchError, match=r"config.rl.reward_model"):
        loop.train(config, run)
    # The same path holding another model (the reward model trained further): its fingerprint refuses it
    config.rl.reward_model = str(own_rm)
    config.train.allow_config_change = True  # the longer run is allowed; another reward model is not
    _train_further(own_rm)
    with pytest.raises(loop.ConfigMismatchError, match=r"reward:reward_model"):
        loop.train(config, run)


def _train_further(workdir):
    """The reward model run in `workdir` trained one step further."""
    config = checkpointing.config_from_dict(json.loads((workdir / "config.json").read_text()))
    config.train.num_steps = 3
    config.train.allow_config_change = True
    loop.train(config, workdir)


def test_step_record_counts_each_completion_once_over_minibatches_and_epochs():
    # 2 epochs x 2 minibatches of 4 completions (3 and 5 tokens): the rollout had 8 and 16 tokens.
    updates = [{"completions": 4.0, "completion_tokens": t, "loss": l, "learning_rate": lr}
               for t, l, lr in [(3.0, 1.0, 0.1), (5.0, 2.0, 0.2), (3.0, 3.0, 0.3), (5.0, 4.0, 0.4)]]
    record = rl_loop.mean_metrics(updates, epochs=2)
    assert record["completions"] == 8 and record["completion_tokens"] == 8
    assert record["loss"] == 2.5 and record["learning_rate"] == 0.4  # means, and the last schedule value
