"""GRPO and PPO losses, group advantages and GAE on small cases written out token by token."""

from __future__ import annotations

import math
import types

import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import default_config
from flan_jax.rl import advantages as adv
from flan_jax.rl.grpo import GRPO
from flan_jax.rl.ppo import PPO

V = 4  # vocabulary of the stand-in model


class LogitsModel:
    """Stands in for the policy: hidden states ARE the logits (head = identity); values come from a table."""

    def __init__(self, logits: np.ndarray, values: np.ndarray | None = None):
        self.logits, self.values = jnp.asarray(logits, jnp.float32), values

    def hidden_states(self, tokens, *, positions, segment_ids):
        return self.logits, jnp.eye(V, dtype=jnp.float32)

    def scalar_head(self, name, hidden):
        assert name == "value"
        return jnp.asarray(self.values, jnp.float32) + 0.0 * hidden[..., 0]


def _case(seed: int = 0):
    """2 rows x 4 positions: row 0 completes at positions 1-3, row 1 at positions 2-3 (mask)."""
    rng = np.random.default_rng(seed)
    mask = np.array([[0, 1, 1, 1], [0, 0, 1, 1]], np.float32)
    logits = rng.normal(size=(2, 4, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(2, 4)).astype(np.int32)
    old = np.log(rng.uniform(0.05, 0.6, size=(2, 4))).astype(np.float32) * mask
    ref = np.log(rng.uniform(0.05, 0.6, size=(2, 4))).astype(np.float32) * mask
    advantages = (np.array([[1.5], [-0.7]], np.float32) * mask)
    batch = {
        "input_tokens": np.zeros((2, 4), np.int32), "target_tokens": targets,
        "positions": np.tile(np.arange(4, dtype=np.int32), (2, 1)), "segment_ids": np.ones((2, 4), np.int32),
        "completion_mask": mask, "old_logps": old, "ref_logps": ref, "advantages": advantages,
    }
    return batch, logits


def _logp(logits, target, temperature):
    z = [x / temperature for x in logits]
    top = max(z)
    return z[target] - (top + math.log(sum(math.exp(x - top) for x in z)))


def _config(**rl):
    config = default_config.get_config()
    for key, value in rl.items():
        config.rl[key] = value
    return config


def _loss(objective, model, batch):
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    prepared = objective.prepare(jbatch)
    total, sums = objective.loss_sum(types.SimpleNamespace(model=model), {**jbatch, **prepared.features})
    return float(total / prepared.denominator), {k: float(v / prepared.denominator) for k, v in sums.items()}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_by_hand(loss_type):
    batch, logits = _case()
    t, beta, eps = 0.8, 0.1, 0.2
    objective = GRPO(_config(temperature=t, kl_coef=beta, epsilon=eps, loss_type=loss_type, max_new_tokens=5))
    loss, metrics = _loss(objective, LogitsModel(logits), batch)

    per_row, tokens, kls, clipped = [], [], [], []
    for r in range(2):
        row = []
        for i in range(4):
            if not batch["completion_mask"][r, i]:
                continue
            logp = _logp(logits[r, i], batch["target_tokens"][r, i], t)
            ratio = math.exp(logp - batch["old_logps"][r, i])
            a = float(batch["advantages"][r, i])
            pg = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            d = float(batch["ref_logps"][r, i]) - logp
            kl = math.exp(d) - d - 1
            row.append(pg + beta * kl)
            kls.append(kl)
            clipped.append((ratio < 1 - eps and a < 0) or (ratio > 1 + eps and a > 0))
        per_row.append(row)
        tokens += row
    expected = {
        "grpo": sum(sum(row) / len(row) for row in per_row) / 2,
        "dapo": sum(tokens) / len(tokens),
        "dr_grpo": sum(tokens) / (2 * 5),
    }[loss_type]
    assert loss == pytest.approx(expected, rel=1e-5)
    assert metrics["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(sum(clipped) / len(clipped), abs=1e-7)


def test_grpo_kl_is_zero_when_the_policy_is_the_reference():
    batch, logits = _case()
    mask = batch["completion_mask"]
    logps = np.array([[_logp(logits[r, i], batch["target_tokens"][r, i], 1.0) for i in range(4)] for r in range(2)], np.float32)
    batch["ref_logps"] = batch["old_logps"] = logps * mask
    objective = GRPO(_config(temperature=1.0, kl_coef=0.5))
    loss, metrics = _loss(objective, LogitsModel(logits), batch)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7) and metrics["ratio"] == pytest.approx(1.0, abs=1e-6)
    # on-policy with ratio 1: the loss is -mean(advantage) per completion, the KL adds nothing
    assert loss == pytest.approx(-(1.5 - 0.7) / 2, rel=1e-5)


def test_ppo_loss_by_hand():
    batch, logits = _case(1)
    rng = np.random.default_rng(3)
    mask = batch["completion_mask"]
    values = rng.normal(size=(2, 4)).astype(np.float32)
    batch["old_values"] = (values + rng.normal(scale=0.5, size=(2, 4)).astype(np.float32)) * mask
    batch["returns"] = rng.normal(size=(2, 4)).astype(np.float32) * mask
    batch["advantages"] = rng.normal(size=(2, 4)).astype(np.float32) * mask
    del batch["ref_logps"]
    t, eps, c, vf_coef = 1.3, 0.2, 0.2, 0.5
    objective = PPO(_config(temperature=t, epsilon=eps, cliprange_value=c, vf_coef=vf_coef))
    loss, metrics = _loss(objective, LogitsModel(logits, values), batch)
    pgs, vfs = [], []
    for r in range(2):
        for i in range(4):
            if not mask[r, i]:
                continue
            ratio = math.exp(_logp(logits[r, i], batch["target_tokens"][r, i], t) - batch["old_logps"][r, i])
            a = float(batch["advantages"][r, i])
            pgs.append(max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)))
            v, v_old, ret = float(values[r, i]), float(batch["old_values"][r, i]), float(batch["returns"][r, i])
            v_clip = v_old + min(max(v - v_old, -c), c)
            vfs.append(0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2))
    assert metrics["pg_loss"] == pytest.approx(sum(pgs) / len(pgs), rel=1e-5)
    assert metrics["vf_loss"] == pytest.approx(sum(vfs) / len(vfs), rel=1e-5)
    assert loss == pytest.approx((sum(pgs) + vf_coef * sum(vfs)) / len(pgs), rel=1e-5)


def _gae_direct(rewards, values, mask, gamma, lam):
    """The textbook recursion, row by row over the completion's own tokens."""
    advantages = np.zeros_like(rewards)
    for r in range(rewards.shape[0]):
        idx = [i for i in range(rewards.shape[1]) if mask[r, i]]
        running = 0.0
        for k in reversed(range(len(idx))):
            i = idx[k]
            next_value = values[r, idx[k + 1]] if k + 1 < len(idx) else 0.0
            delta = rewards[r, i] + gamma * next_value - values[r, i]
            running = delta + gamma * lam * running
            advantages[r, i] = running
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_the_direct_recursion(gamma, lam):
    rng = np.random.default_rng(4)
    rows, length = 5, 9
    mask = np.zeros((rows, length), np.float32)
    for r in range(rows):
        start = int(rng.integers(0, 4))
        mask[r, start:start + int(rng.integers(1, length - start + 1))] = 1
    rewards = rng.normal(size=(rows, length)).astype(np.float32)
    values = rng.normal(size=(rows, length)).astype(np.float32)
    ours_a, ours_r = adv.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
    want_a, want_r = _gae_direct(rewards * mask, values * mask, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(ours_a), want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours_r), want_r, rtol=1e-5, atol=1e-6)


def test_token_rewards_fold_the_kl_penalty_and_put_the_score_on_the_last_token():
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    logps = np.array([[0, -1.0, -2.0, 0], [-0.5, -0.5, -0.5, -0.5]], np.float32)
    ref = np.array([[0, -1.5, -1.0, 0], [-0.5, -1.0, -0.5, -0.25]], np.float32)
    rewards, kl = adv.token_rewards(jnp.asarray([2.0, np.nan]), jnp.asarray(logps), jnp.asarray(ref), jnp.asarray(mask), 0.1)
    np.testing.assert_allclose(np.asarray(kl), (logps - ref) * mask)
    np.testing.assert_allclose(np.asarray(rewards), [[0, -0.05, 0.1 + 2.0, 0], [0, -0.05, 0, 0.025]], atol=1e-6)


def test_whiten_is_zero_mean_unit_variance_over_the_mask():
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, size=(4, 6)).astype(np.float32)
    mask = (rng.random((4, 6)) < 0.6).astype(np.float32)
    out = np.asarray(adv.whiten(jnp.asarray(x), jnp.asarray(mask)))
    kept = out[mask > 0]
    assert abs(kept.mean()) < 1e-5 and kept.std(ddof=1) == pytest.approx(1.0, rel=1e-4)
    assert np.all(out[mask == 0] == 0)


def test_group_advantages_normalise_each_group_alone():
    rewards = np.array([1.0, 0.0, 0.0, 0.0, 5.0, 7.0, 9.0, 11.0], np.float32)
    out, stats = adv.group_advantages(jnp.asarray(rewards), 4, "group")
    out = np.asarray(out)
    for group in (out[:4], out[4:]):
        assert abs(group.mean()) < 1e-5 and group.std(ddof=1) == pytest.approx(1.0, rel=1e-3)
    # the same rewards shifted and scaled within a group give the same advantages
    np.testing.assert_allclose(out[4:], np.asarray(adv.group_advantages(jnp.asarray(rewards[4:] * 3 - 1), 4)[0]), rtol=1e-3)
    none, _ = adv.group_advantages(jnp.asarray(rewards), 4, "none")  # Dr. GRPO: mean removed, no division
    np.testing.assert_allclose(np.asarray(none), [0.75, -0.25, -0.25, -0.25, -3, -1, 1, 3], atol=1e-6)
    assert float(stats["frac_reward_zero_std"]) == 0.0


def test_group_advantages_leave_out_nan_rewards():
    rewards = jnp.asarray([1.0, np.nan, 0.0, 2.0, 2.0, 2.0])
    out, stats = adv.group_advantages(rewards, 3, "group")
    out = np.asarray(out)
    assert out[1] == 0.0
    np.testing.assert_allclose(out[[0, 2]], [1 / (math.sqrt(0.5) + 1e-4) * 0.5, -0.5 / (math.sqrt(0.5) + 1e-4)], rtol=1e-5)
    assert np.all(out[3:] == 0) and float(stats["frac_reward_zero_std"]) == 0.5
