"""The demo's RL stage config: GRPO of the tuned demo model on the synthetic tasks, rewarded by their own exact match.

    python -m flan_jax.train --config=configs/grpo_demo.py:workdirs/demo --workdir=workdirs/demo_grpo

`make demo` (flan_jax/cli/demo.py) runs it after SFT (and the preference stage) into `<workdir>/rl`.
It lives in the package (configs/grpo_demo.py re-exports it) so that an installed flan_jax runs the
whole demo.

Prompts are the seen tasks with their TRAINING templates (`synthetic_train`); the reward is each
task's own metric on the sampled answer (`rl.rewards = ("task_metric",)`: exact match, no extra
code). Evaluation is the SFT demo's: the seen tasks with their HELD-OUT templates and the held-out
cluster, so a gain there is generalisation, not memorised wordings. Nothing is downloaded.
"""

from __future__ import annotations

import ml_collections

from flan_jax.cli import demo_config


def rl_config(sft_config: ml_collections.ConfigDict, sft_workdir: str) -> ml_collections.ConfigDict:
    """The GRPO stage on top of the SFT run's config (its model, tokenizer and evaluation settings,
    overrides included, carry over); starts from that run's newest checkpoint and tokenizer."""
    config = sft_config.copy_and_resolve_references()
    config.checkpoint.init_from = str(sft_workdir)  # its weights and (tokenizer.path empty) its tokenizer
    config.data.train_mixture = "synthetic_train"
    config.data.seq_len = 128  # prompts of the synthetic tasks fit in 112 tokens with the demo tokenizer
    config.data.batch_size = 64  # completions per step: 8 prompts x 8 samples

    config.objective.name = "grpo"
    config.rl.group_size = 8
    config.rl.max_new_tokens = 16  # answers are 1-5 words
    config.rl.temperature = 1.0
    config.rl.rewards = ("task_metric",)
    config.rl.kl_coef = 0.02
    config.rl.loss_type = "grpo"
    config.rl.on_long_prompt = "truncate"  # counted and logged; the demo's prompts fit

    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 5
    config.optimizer.schedule = "constant"
    config.optimizer.weight_decay = 0.0
    config.train.num_steps = 60
    config.train.log_every = 5
    config.checkpoint.every_steps = 30

    config.eval.at_start = False  # step 0 is the SFT model, evaluated by the SFT run
    # config.eval is the SFT run's: the seen tasks with held-out templates and the held-out cluster.
    return config


def get_config(sft_workdir: str = "workdirs/demo") -> ml_collections.ConfigDict:
    return rl_config(demo_config.get_config(), sft_workdir)
