"""One rollout: sample G completions per prompt with the current policy, score them, compute advantages.

    prompts --generate (KV cache, temperature / top-k / top-p)--> completions
            --rewards (host: task metrics, reward model, user functions, penalties)--> scores
            --scoring pass (jit, same mesh): old log-probs, reference log-probs, old values-->
            --advantages (GRPO: per group; PPO: KL-penalised token rewards + GAE)--> update batch

Generation runs `flan_jax.model.generate` on the policy module merged from the train state's own
parameter arrays (no copy of the weights: the same sharded buffers the update reads), under the
run's mesh and axis rules, so rollouts are data-parallel like the update. Its randomness is a
function of the run's RNG and the step, so a resumed run samples the same completions.

The old log-probs come from a separate forward pass of the same parameters over the update layout
(flan_jax/rl/batch.py), so the importance ratio compares like with like; with one update per
rollout (rl.epochs = rl.minibatches = 1) it is 1 up to float rounding, as in trl.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flan_jax import sharding
from flan_jax.rl import advantages as advantages_lib
from flan_jax.rl import batch as batch_lib
from flan_jax.rl import logprobs
from flan_jax.rl.prompts import Prompt
from flan_jax.rl.rewards import Completion, RewardSet

ROLLOUT_SALT = 0x5EED  # sampling keys are fold_in(run key, salt, step): never the update's keys


@dataclasses.dataclass
class Rollout:
    """The update batch (host arrays, all rows) and what the rollout measured (for the logs)."""

    batch: dict[str, np.ndarray]
    metrics: dict[str, float]
    completions: list[Completion]
    rewards: np.ndarray


class Roller:
    """Samples and scores the rollouts of a run (see the module docstring)."""

    def __init__(self, config: Any, objective: Any, parts: Any, tokenizer: Any, rewards: RewardSet, mesh, rules):
        self.config, self.objective, self.parts = config, objective, parts
        self.tokenizer, self.rewards, self.mesh, self.rules = tokenizer, rewards, mesh, rules
        rl = config.rl
        self.group_size = int(rl.group_size)
        self.max_new_tokens = int(rl.max_new_tokens)
        self.seq_len = int(config.data.seq_len)
        self.temperature, self.top_p, self.top_k = float(rl.temperature), float(rl.top_p), int(rl.top_k)
        self.is_ppo = "value" in objective.model_heads
        self.kl_coef = float(rl.kl_coef)
        self.accum = int(config.optimizer.grad_accum_steps)
        replicated = NamedSharding(mesh, PartitionSpec())
        self._score = jax.jit(self._score_pass, out_shardings=replicated)
        self._advantages = jax.jit(self._advantage_pass, out_shardings=replicated)

    # ------------------------------------------------------------------ sampling
    def sample(self, params: Any, frozen: dict, prompts: Sequence[Prompt], rng: jax.Array) -> tuple[list[list[int]], np.ndarray]:
        """Completion tokens (EOS appended when generated) of G samples per prompt, and whether each ended."""
        from flan_jax.model import generate

        rows = [p.tokens for p in prompts for _ in range(self.group_size)]
        model = self.parts.merge(params, frozen.get("base"))
        with jax.set_mesh(self.mesh), sharding.use_rules(self.mesh, self.rules):
            out = generate.generate_arrays(
                model, rows, max_new_tokens=self.max_new_tokens, eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.pad_id, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, rng=rng,
            )
        ended = out.lengths < self.max_new_tokens
        completions = [
            [*row[:n].tolist(), *([self.tokenizer.eos_id] if done else [])]
            for row, n, done in zip(out.tokens, out.lengths, ended)
        ]
        return completions, ended

    # ------------------------------------------------------------------ device passes
    def _score_pass(self, params, frozen, batch):
        """old log-probs (and values), reference log-probs: one forward per model, micro-batched like the update."""

        def one(chunk):
            mask = chunk["completion_mask"]
            base = frozen.get("base")
            stats = logprobs.token_stats(self.parts.merge(params, base), chunk, self.objective.temperature, values=self.is_ppo)
            out = {"old_logps": stats["logps"] * mask}
            if self.is_ppo:
                out["old_values"] = stats["values"] * mask
            if self.kl_coef:
                reference = self.parts.merge(frozen["reference"], base)
                out["ref_logps"] = logprobs.token_stats(reference, chunk, self.objective.temperature)["logps"] * mask
            return out

        with sharding.use_rules(self.mesh, self.rules):
            if self.accum == 1:
                return one(batch)
            rows = batch["input_tokens"].shape[0]
            chunks = {k: v.reshape(self.accum, rows // self.accum, *v.shape[1:]) for k, v in batch.items()}
            out = jax.lax.map(one, chunks)
            return {k: v.reshape(rows, *v.shape[2:]) for k, v in out.items()}

    def _advantage_pass(self, rewards, scored, mask):
        rl = self.config.rl
        if not self.is_ppo:
            advantages, stats = advantages_lib.group_advantages(rewards, self.group_size, str(rl.scale_rewards))
            return {"advantages": advantages[:, None] * mask}, stats
        ref = scored.get("ref_logps", scored["old_logps"])
        token_rewards, kl = advantages_lib.token_rewards(rewards, scored["old_logps"], ref, mask, self.kl_coef)
        advantages, returns = advantages_lib.gae(token_rewards, scored["old_values"], mask, gamma=float(rl.gamma), lam=float(rl.lam))
        if bool(rl.whiten_advantages):
            advantages = advantages_lib.whiten(advantages, mask)
        tokens = jnp.maximum(jnp.sum(mask), 1.0)
        return {"advantages": advantages, "returns": returns}, {"kl_ref": jnp.sum(kl) / tokens}

    # ------------------------------------------------------------------ the whole rollout
    def __call__(self, params: Any, frozen: dict, prompts: Sequence[Prompt], rng: jax.Array) -> Rollout:
        started = time.perf_counter()
        completions, ended = self.sample(params, frozen, prompts, rng)
        generation_seconds = time.perf_counter() - started
        examples = [p.example for p in prompts for _ in range(self.group_size)]
        prompt_tokens = [p.tokens for p in prompts for _ in range(self.group_size)]
        texts = [self.tokenizer.decode(c[:-1] if done else c).strip() for c, done in zip(completions, ended)]
        items = [
            Completion(text=t, example=ex, prompt_tokens=pt, tokens=c, ended=bool(done))
            for t, ex, pt, c, done in zip(texts, examples, prompt_tokens, completions, ended)
        ]
        scored = self.rewards(items)
        batch = batch_lib.build_rows(prompt_tokens, completions, self.seq_len)
        batch["completion_mask"][scored.bad] = 0.0  # skipped completions leave the loss
        mask = batch["completion_mask"]
        with jax.set_mesh(self.mesh):
            passes = self._score(params, frozen, batch)
            extra, stats = self._advantages(jnp.asarray(scored.total, jnp.float32), passes, jnp.asarray(mask))
        batch.update({k: np.asarray(v) for k, v in jax.device_get({**passes, **extra}).items()})
        metrics = self._metrics(items, scored, ended, jax.device_get(stats))
        metrics["generation_seconds"] = generation_seconds
        return Rollout(batch=batch, metrics=metrics, completions=items, rewards=scored.total)

    def _metrics(self, items, scored, ended, stats) -> dict[str, float]:
        valid = ~scored.bad
        lengths = np.asarray([len(c.tokens) for c in items], np.float64)
        total = scored.total[valid]
        out = {
            "reward": float(np.mean(total)) if total.size else float("nan"),
            "reward_std": float(np.std(total, ddof=1)) if total.size > 1 else 0.0,
            "completion_length": float(np.mean(lengths)),
            "completion_length_max": float(np.max(lengths)),
            "frac_no_eos": float(np.mean(~ended)),
            "format_penalty": float(np.mean(scored.penalty)),
            "bad_rewards_step": int(np.sum(scored.bad)),
        }
        for name, values in scored.per_reward.items():
            finite = values[np.isfinite(values)]
            out[f"rewards/{name}"] = float(np.mean(finite)) if finite.size else float("nan")
        out.update({k: float(v) for k, v in stats.items()})
        return out
