"""Shared by the RL loop tests: a reward with signal for an untrained model, and tiny RL run configs.

Imported by child processes through `config.data.task_modules = ("flan_jax_tasks", "tests.rl_fakes")`, which registers
the reward there too.
"""

from __future__ import annotations

from flan_jax import rl
from tests import train_fakes

LOW_ID = 200  # the reward: the share of completion tokens with an id below this


def _low_ids(config, runtime):
    return lambda completions: [sum(t < LOW_ID for t in c.tokens) / max(len(c.tokens), 1) for c in completions]


rl.register_reward_factory("rl_test_low_ids", _low_ids, replace=True)


def rl_overrides(tokenizer_path, objective: str = "grpo", **overrides) -> dict:
    """TINY_DEMO as an RL run: 4 prompts x 4 samples of 8 tokens per step, the low-ids reward."""
    values = train_fakes.demo_overrides(
        tokenizer_path,
        objective__name=objective,
        data__task_modules=("flan_jax_tasks", "tests.rl_fakes"),
        data__batch_size=16,
        rl__group_size=4,
        rl__max_new_tokens=8,
        rl__rewards=("rl_test_low_ids",),
        rl__kl_coef=0.02,
        rl__on_long_prompt="skip",
        optimizer__learning_rate=1e-2,
        optimizer__warmup_steps=0,
        optimizer__schedule="constant",
    )
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return values
