"""PPO with a value head and a per-token KL penalty (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019).

The rollout (flan_jax/rl/loop.py) scores each completion (reward model, task metric, ...), folds
`-kl_coef (log pi - log pi_ref)` into every token's reward, and runs GAE (gamma, lambda) with the
old values of the `value` head on the policy's own trunk (advantages whitened over the batch).
Per completion token, averaged over the batch's tokens:

    pg_t = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps_high))
    vf_t = 0.5 max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)^2)      c = rl.cliprange_value
    loss = mean(pg) + vf_coef mean(vf) [+ ptx_coef x SFT loss of a ptx_mixture batch: PPO-ptx]

Logged: `pg_loss`, `vf_loss`, `clip_fraction`, `vf_clip_fraction`, `approx_kl` (0.5 (log ratio)^2),
`entropy`, `values`, `ptx_loss`; the rollout adds the rewards, the KL to the reference and lengths.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from flan_jax.data.packing import BATCH_KEYS as SFT_KEYS
from flan_jax.rl import logprobs
from flan_jax.rl.batch import LAYOUT_KEYS
from flan_jax.rl.objective import TOKEN_WEIGHTS, RLObjective
from flan_jax.train import losses
from flan_jax.train.objectives import register_objective
from flan_jax.train.objectives.base import ObjectiveContext, Prepared

PTX_PREFIX = "ptx_"
PTX_WEIGHTS = "ptx_token_weights"


@register_objective("ppo")
class PPO(RLObjective):
    model_heads = (logprobs.VALUE_HEAD,)
    rollout_features = ("old_logps", "advantages", "old_values", "returns")
    loss_type = "dapo"

    def __init__(self, config):
        super().__init__(config)
        rl = self.settings
        self.vf_coef, self.cliprange_value = float(rl.vf_coef), float(rl.cliprange_value)
        self.ptx_coef = float(rl.ptx_coef)
        if self.ptx_coef and not rl.ptx_mixture:
            raise ValueError("config.rl.ptx_coef > 0 needs config.rl.ptx_mixture (the SFT mixture PPO-ptx mixes in)")
        # The KL penalty is in the rewards, computed at rollout time: the update needs no reference log-probs.
        self.features = LAYOUT_KEYS + self.rollout_features + (
            tuple(PTX_PREFIX + k for k in SFT_KEYS) if self.ptx_coef else ()
        )

    def prepare(self, batch: Mapping[str, jax.Array]) -> Prepared:
        prepared = super().prepare(batch)
        if not self.ptx_coef:
            return prepared
        ptx = batch[PTX_PREFIX + "loss_weights"].astype(jnp.float32)
        scale = prepared.denominator * self.ptx_coef / jnp.maximum(jnp.sum(ptx), 1.0)
        return Prepared(
            features={**prepared.features, PTX_WEIGHTS: ptx * scale}, denominator=prepared.denominator,
            metrics={**prepared.metrics, "ptx_tokens": jnp.sum(ptx)},
        )

    def loss_sum(self, ctx: ObjectiveContext, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        model = ctx.model
        stats = logprobs.token_stats(model, batch, self.temperature, entropy=True, values=True)
        pg, token_metrics = self.clipped_objective(stats["logps"], batch)
        values, old_values, returns = stats["values"], batch["old_values"], batch["returns"]
        clipped_values = old_values + jnp.clip(values - old_values, -self.cliprange_value, self.cliprange_value)
        vf_unclipped, vf_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
        vf = 0.5 * jnp.maximum(vf_unclipped, vf_clipped)
        weights = batch[TOKEN_WEIGHTS]
        total = jnp.sum((pg + self.vf_coef * vf) * weights)
        log_ratio = stats["logps"] - batch["old_logps"]
        token_metrics.update(
            entropy=stats["entropy"], approx_kl=0.5 * log_ratio**2, values=values,
            vf_clip_fraction=(vf_clipped > vf_unclipped).astype(jnp.float32),
        )
        metrics = self.token_sums(batch, token_metrics)
        metrics["pg_loss"] = jnp.sum(jax.lax.stop_gradient(pg) * weights)
        metrics["vf_loss"] = jnp.sum(jax.lax.stop_gradient(vf) * weights)
        if self.ptx_coef:
            hidden, head = model.hidden_states(
                batch[PTX_PREFIX + "input_tokens"], positions=batch[PTX_PREFIX + "positions"],
                segment_ids=batch[PTX_PREFIX + "segment_ids"],
            )
            nll = losses.head_cross_entropy(hidden, head, batch[PTX_PREFIX + "target_tokens"])
            ptx = jnp.sum(nll * batch[PTX_WEIGHTS])
            total = total + ptx
            metrics["ptx_loss"] = jax.lax.stop_gradient(ptx) / self.ptx_coef
        return total, metrics
