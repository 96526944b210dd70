"""Advantages: GRPO's group-normalised rewards and PPO's generalised advantage estimation (GAE).

GRPO (DeepSeekMath, Shao et al. 2024): the completions of one prompt form a group; a completion's
advantage is its reward minus the group's mean, divided by the group's standard deviation
(`scale="group"`, Bessel-corrected, + 1e-4 as trl 1.16 does), by the batch's ("batch"), or by
nothing ("none": Dr. GRPO, Liu et al. 2025, which removes the question-difficulty bias of the
division). Rewards that are NaN (a completion whose reward failed, skipped by
`rl.on_bad_reward="skip"`) take no part in the statistics and get advantage 0.

PPO (Schulman et al. 2017; InstructGPT's per-token KL penalty folded into the rewards): over the
completion tokens of each row, delta_t = r_t + gamma V_{t+1} - V_t (V past the last token = 0) and
A_t = delta_t + gamma lambda A_{t+1}; returns = A + V. `whiten` normalises advantages over all the
batch's completion tokens (trl's masked_whiten).

Inputs are rows of the update layout (flan_jax/rl/batch.py): [rows, L] per-token arrays with a
`mask` of the completion's target positions, rows grouped prompt by prompt (row = prompt * G + g).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALES = ("group", "batch", "none")
STD_EPS = 1e-4


def _nanstd(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Bessel-corrected standard deviation ignoring NaNs (NaN with fewer than two values), as trl's nanstd."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
    variance = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True) * count / jnp.maximum(count - 1, 1)
    std = jnp.where(count > 1, jnp.sqrt(variance), jnp.nan)
    return std if keepdims else jnp.squeeze(std, axis=axis)


def group_advantages(rewards: jax.Array, group_size: int, scale: str = "group") -> tuple[jax.Array, dict[str, jax.Array]]:
    """[rows] rewards (NaN = left out) -> [rows] advantages and group statistics for the logs."""
    if scale not in SCALES:
        raise ValueError(f"config.rl.scale_rewards={scale!r}: expected one of {SCALES}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not form groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    mean = jnp.nanmean(grouped, axis=1, keepdims=True)
    group_std = _nanstd(grouped, axis=1, keepdims=True) if group_size > 1 else jnp.zeros_like(mean)
    advantages = grouped - mean
    if scale == "group":
        advantages = advantages / (group_std + STD_EPS)
    elif scale == "batch":
        advantages = advantages / (_nanstd(rewards) + STD_EPS)
    advantages = jnp.nan_to_num(advantages.reshape(-1), nan=0.0)
    stats = {"frac_reward_zero_std": jnp.mean(jnp.isclose(jnp.nan_to_num(group_std, nan=0.0), 0.0).astype(jnp.float32))}
    return advantages, stats


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Per-token (advantages, returns) [rows, L] over each row's completion tokens (`mask`), 0 elsewhere."""
    mask = mask.astype(jnp.float32)
    rewards, values = rewards * mask, values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + gamma * next_values * next_mask - values

    def back(carry, xs):
        delta, keep, has_next = xs
        advantage = (delta + gamma * lam * carry * has_next) * keep
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros(rewards.shape[0], jnp.float32), (deltas.T, mask.T, next_mask.T), reverse=True)
    advantages = advantages.T
    return advantages, (advantages + values) * mask


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked entries (unbiased variance), 0 outside the mask."""
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    mean = jnp.sum(x * mask) / jnp.maximum(count, 1.0)
    variance = jnp.sum(((x - mean) ** 2) * mask) / jnp.maximum(count, 1.0) * count / jnp.maximum(count - 1.0, 1.0)
    return (x - mean) * jax.lax.rsqrt(variance + eps) * mask


def token_rewards(scores: jax.Array, logps: jax.Array, ref_logps: jax.Array, mask: jax.Array, kl_coef: float) -> tuple[jax.Array, jax.Array]:
    """PPO's per-token rewards: -kl_coef (log pi - log pi_ref) at every completion token, + the
    sequence score (NaN: 0, the row is left out) at its last one. Also returns the per-token KL."""
    mask = mask.astype(jnp.float32)
    kl = (logps - ref_logps) * mask
    last = mask * (1.0 - jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1))
    return -kl_coef * kl + last * jnp.nan_to_num(scores)[:, None], kl
