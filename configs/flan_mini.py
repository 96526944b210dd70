"""FLAN-style instruction tuning on the real data folder: T0 + FLAN CoT + GSM8K (`flan_mini`).

Needs FLAN_JAX_DATA_DIR (for example `export FLAN_JAX_DATA_DIR=../shared/data`):

    python -m flan_jax.train --config=configs/flan_mini.py --workdir=/tmp/flan_mini

The mixture and its weights are defined in `tasks/flan_mini.py`; evaluation covers GSM8K (test
split, final-number accuracy) and the held-out instruction-following sets (ROUGE-L). Only
fields that differ from `flan_jax/default_config.py` are set here.
"""

from flan_jax import default_config


def get_config():
    config = default_config.get_config()

    config.data.train_mixture = "flan_mini"
    config.data.seq_len = 1024  # T0 summarization inputs and CoT rationales are long
    config.data.batch_size = 16
    # Trained from the mixture into the workdir on first use.
    config.data.tokenizer.path = ""
    config.data.tokenizer.vocab_size = 8000
    config.data.tokenizer.train_examples = 50_000

    config.model.vocab_size = 8000
    config.model.max_positions = 1024

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 200

    config.train.num_steps = 5000
    config.train.log_every = 50

    config.checkpoint.every_steps = 1000

    config.eval.mixtures = ("gsm8k", "instruction_eval")
    config.eval.every_steps = 1000
    config.eval.max_examples_per_task = 100
    config.eval.max_new_tokens = 128
    return config
