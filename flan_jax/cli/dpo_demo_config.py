"""The demo's preference stage config: DPO of the tuned demo model on the synthetic verifiable pairs.

    python -m flan_jax.train --config=configs/dpo_demo.py:workdirs/demo --workdir=workdirs/demo_dpo

`make demo` (flan_jax/cli/demo.py) runs it after SFT into `<workdir>/preference`. It lives in the
package (configs/dpo_demo.py re-exports it) so that an installed flan_jax runs the whole demo.

The pairs are the synthetic tasks' correct answers against wrong ones (flan_jax_tasks/synthetic_pairs.py),
so nothing is downloaded. The reference log-probs are computed once before training and cached
in the workdir (config.objective.reference = "cache").
"""

from __future__ import annotations

import ml_collections

from flan_jax.cli import demo_config


def preference_config(sft_config: ml_collections.ConfigDict, sft_workdir: str) -> ml_collections.ConfigDict:
    """The DPO stage on top of the SFT run's config (so its model, tokenizer and data settings,
    overrides included, carry over); starts from that run's newest checkpoint and tokenizer."""
    config = sft_config.copy_and_resolve_references()
    config.checkpoint.init_from = str(sft_workdir)  # its weights and (tokenizer.path empty) its tokenizer
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


def get_config(sft_workdir: str = "workdirs/demo") -> ml_collections.ConfigDict:
    return preference_config(demo_config.get_config(), sft_workdir)
