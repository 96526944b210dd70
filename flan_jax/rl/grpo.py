"""GRPO (DeepSeekMath, Shao et al. 2024): PPO's clipped ratio with group-normalised advantages, no value model.

Per completion token t of completion i (advantage A_i from flan_jax.rl.advantages.group_advantages):

    loss_t = -min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps_high) A_i) + kl_coef * k3_t
    ratio_t = exp(log pi(y_t) - log pi_old(y_t)),  k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1

aggregated by `config.rl.loss_type` (flan_jax/rl/objective.py). `rl.kl_ratio_correction=True`
multiplies k3 by the (differentiable) ratio, DeepSeek-V3.2's unbiased reverse-KL gradient (trl 1.16's
default `use_bias_correction_kl`); the default False is DeepSeekMath's GRPO. With `rl.scale_rewards="none"` and
`loss_type="dr_grpo"` this is Dr. GRPO. Checked against trl 1.16's GRPOTrainer loss on the same model,
completions and rewards (tests/test_rl_parity.py).

Logged per step (token means): `kl` (k3 to the reference), `entropy`, `clip_fraction` (share of
tokens whose ratio left the clip range in the direction the advantage pushes), `ratio`, `pg_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from flan_jax.rl import logprobs
from flan_jax.rl.objective import LOSS_TYPES, TOKEN_WEIGHTS, RLObjective, k3_kl
from flan_jax.train.objectives import register_objective
from flan_jax.train.objectives.base import ObjectiveContext


@register_objective("grpo")
class GRPO(RLObjective):
    def __init__(self, config):
        super().__init__(config)
        self.loss_type = str(self.settings.loss_type)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"config.rl.loss_type={self.loss_type!r}: expected one of {LOSS_TYPES}")

    def loss_sum(self, ctx: ObjectiveContext, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        stats = logprobs.token_stats(ctx.model, batch, self.temperature, entropy=True)
        pg, token_metrics = self.clipped_objective(stats["logps"], batch)
        per_token = pg
        token_metrics.update(entropy=stats["entropy"])
        if self.kl_coef:
            kl = k3_kl(stats["logps"], batch["ref_logps"])
            if self.settings.kl_ratio_correction:
                kl = kl * jnp.exp(stats["logps"] - batch["old_logps"])
            per_token = per_token + self.kl_coef * kl
            token_metrics["kl"] = kl
        weights = batch[TOKEN_WEIGHTS]
        metrics = self.token_sums(batch, token_metrics)
        metrics["pg_loss"] = jnp.sum(jax.lax.stop_gradient(pg) * weights)
        return jnp.sum(per_token * weights), metrics
