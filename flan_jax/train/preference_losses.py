"""Per-pair losses and implicit rewards of the preference objectives, as plain functions of per-pair arrays.

Inputs are per-pair arrays of any shape (the objectives pass `[rows, max_pairs]`): policy and
reference log-probabilities of the chosen and rejected responses (sums over response tokens) and,
for the length-normalised losses, the response lengths in tokens. Each function returns
`(loss, chosen_reward, rejected_reward)` per pair; the objectives mask and sum them.

  dpo      Rafailov et al. 2023: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)));
           with label_smoothing eps > 0 it is conservative DPO (cDPO, Mitchell 2023):
           -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
  ipo      Azar et al. 2023, length-normalised as in trl:
           ((pi_c - ref_c) / len_c - (pi_r - ref_r) / len_r - 1 / (2 beta))^2
  simpo    Meng et al. 2024, reference-free: -log sigmoid(beta (pi_c / len_c - pi_r / len_r) - gamma)
  bradley_terry  the reward model's -log sigmoid(r_c - r_r - margin) (InstructGPT)

Rewards: beta * (pi - ref) for dpo and ipo (what trl logs), beta * pi / len for simpo, the scores
themselves for the reward model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Triple = tuple[jax.Array, jax.Array, jax.Array]


def dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, label_smoothing: float = 0.0) -> Triple:
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    loss = -jax.nn.log_sigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-logits)
    return loss, beta * chosen_ratio, beta * rejected_ratio


def ipo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_length, rejected_length, *, beta: float) -> Triple:
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio / jnp.maximum(chosen_length, 1.0) - rejected_ratio / jnp.maximum(rejected_length, 1.0)
    return jnp.square(delta - 1.0 / (2.0 * beta)), beta * chosen_ratio, beta * rejected_ratio


def simpo(policy_chosen, policy_rejected, chosen_length, rejected_length, *, beta: float, gamma: float,
          label_smoothing: float = 0.0) -> Triple:
    chosen_reward = beta * policy_chosen / jnp.maximum(chosen_length, 1.0)
    rejected_reward = beta * policy_rejected / jnp.maximum(rejected_length, 1.0)
    logits = chosen_reward - rejected_reward - gamma
    loss = -jax.nn.log_sigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-logits)
    return loss, chosen_reward, rejected_reward


def bradley_terry(chosen_score, rejected_score, margin=0.0) -> Triple:
    return -jax.nn.log_sigmoid(chosen_score - rejected_score - margin), chosen_score, rejected_score


LOSSES = ("dpo", "ipo", "simpo")
