"""The demo's preference stage: DPO of the tuned demo model on the synthetic verifiable pairs.

Starts from the SFT demo run (`make demo` or `python -m flan_jax.train --config=configs/demo.py
--workdir=workdirs/demo`); the argument after the colon is that workdir (its newest checkpoint
and its tokenizer are used):

    python -m flan_jax.train --config=configs/dpo_demo.py:workdirs/demo --workdir=workdirs/demo_dpo

The pairs are the synthetic tasks' correct answers against wrong ones (tasks/synthetic_pairs.py),
so nothing is downloaded. The reference log-probs are computed once before training and cached
in the workdir (config.objective.reference = "cache").
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
    config.data.train_mixture = "synthetic_pairs_train"

    config.objective.name = "dpo"
    config.objective.beta = 0.25
    config.objective.reference = "cache"

    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 10
    config.optimizer.schedule = "constant"
    config.train.num_steps = 120
    config.train.log_every = 10
    config.checkpoint.every_steps = 60

    config.eval.at_start = False  # step 0 is the SFT model, evaluated by the SFT run
    config.eval.mixtures = (
        "synthetic_eval_seen_heldout_templates",
        "synthetic_eval_heldout_cluster",
        "synthetic_pairs_eval_seen_heldout_templates",
        "synthetic_pairs_eval_heldout_cluster",
    )
    return config
