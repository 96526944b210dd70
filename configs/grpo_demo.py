"""The demo's RL stage: GRPO of the tuned demo model on the synthetic tasks, rewarded by their own exact match.

Starts from the SFT demo run (`make demo` or `python -m flan_jax.train --config=configs/demo.py
--workdir=workdirs/demo`); the argument after the colon is that workdir (its newest checkpoint and
its tokenizer are used):

    python -m flan_jax.train --config=configs/grpo_demo.py:workdirs/demo --workdir=workdirs/demo_grpo

Prompts are the seen tasks with their TRAINING templates (`synthetic_train`); the reward is each
task's own metric on the sampled answer (`rl.rewards = ("task_metric",)`: exact match, no extra
code). Evaluation is the SFT demo's: the seen tasks with their HELD-OUT templates and the held-out
cluster, so a gain there is generalisation, not memorised wordings. Nothing is downloaded.
"""

import importlib.util
import pathlib

_DEMO = pathlib.Path(__file__).with_name("demo.py")


def _demo_config():
    spec = importlib.util.spec_from_file_location("flan_jax_demo_config", _DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(sft_workdir: str = "workdirs/demo"):
    config = _demo_config()
    config.checkpoint.init_from = sft_workdir  # the SFT run: its weights and (tokenizer.path empty) its tokenizer
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
    config.eval.mixtures = ("synthetic_eval_seen_heldout_templates", "synthetic_eval_heldout_cluster")
    return config
