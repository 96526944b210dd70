"""Online reinforcement learning after SFT: GRPO and PPO inside `python -m flan_jax.train`.

    config.objective.name = "grpo"      # or "ppo"; settings in config.rl (flan_jax/default_config.py)

Modules: prompts (the prompt stream), rewards (the reward registry; reward_model: a trained reward
model as a reward), rollout (sampling + scoring + advantages), advantages (group normalisation,
GAE), objective / grpo / ppo (the losses, on the trainer's objective seam), loop (rollout, update,
checkpoint, evaluate). Guide: docs/training.md, "Reinforcement learning".
"""

from flan_jax.rl.rewards import Completion, register_reward, register_reward_factory, reward_names

__all__ = ["Completion", "register_reward", "register_reward_factory", "reward_names"]
