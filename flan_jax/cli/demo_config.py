"""The embedded demo: a tiny Llama-style model tuned on the built-in synthetic FLAN mixture.

Runs on a laptop CPU in a few minutes with nothing downloaded:

    python -m flan_jax.train --config=configs/demo.py --workdir=/tmp/demo
    python -m flan_jax.demo --workdir=/tmp/demo      (the same run, then the before/after report)

It lives in the package (configs/demo.py re-exports it) so that an installed flan_jax, with no
repository checkout, runs the demo.

Only the fields that differ from the defaults are set here; defaults and
their meaning live in `flan_jax/default_config.py`.
"""

from flan_jax import default_config


def get_config():
    config = default_config.get_config()

    config.data.train_mixture = "synthetic_train"
    config.data.seq_len = 256
    config.data.batch_size = 32
    config.data.tokenizer.kind = "sentencepiece"
    # Trained from the training mixture into the workdir on first use (no file to download).
    config.data.tokenizer.path = ""
    config.data.tokenizer.vocab_size = 1024
    config.data.tokenizer.train_examples = 20_000

    config.model.family = "llama"
    config.model.vocab_size = 1024
    config.model.d_model = 128
    config.model.n_layers = 4
    config.model.n_heads = 4
    config.model.n_kv_heads = 2
    config.model.head_dim = 32
    config.model.d_ff = 384
    config.model.max_positions = 512

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.schedule = "cosine"

    config.train.num_steps = 600
    config.train.log_every = 25

    config.checkpoint.every_steps = 200

    config.eval.every_steps = 0
    config.eval.at_start = True
    config.eval.at_end = True
    config.eval.mixtures = ("synthetic_eval_seen_heldout_templates", "synthetic_eval_heldout_cluster")
    config.eval.max_examples_per_task = 40
    config.eval.max_new_tokens = 32
    return config
