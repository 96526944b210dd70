"""The embedded demo with the encoder-decoder family: a tiny T5 (v1.1 / FLAN-T5 layout) tuned on the
built-in synthetic FLAN mixture, evaluated exactly like configs/demo.py's decoder (held-out templates,
held-out cluster), so the two families can be compared on the same tasks.

    python -m flan_jax.train --config=configs/flan_t5_demo.py --workdir=/tmp/t5_demo

Sizes: about the decoder demo's parameter count (1.25M vs 1.05M: 2 encoder + 2 decoder layers of
width 128 against 4 decoder layers); docs/training.md compares the two runs. The tokenizer is trained
into the workdir with T5's special ids (pad 0 = decoder start, EOS 1, unk 2, 100 sentinels).
"""

from flan_jax import default_config


def get_config():
    config = default_config.get_config()

    config.data.train_mixture = "synthetic_train"
    config.data.seq_len = 256  # encoder rows: the instructions
    config.data.targets_len = 64  # decoder rows: the (short) responses of the synthetic tasks
    config.data.batch_size = 32
    config.data.tokenizer.kind = "sentencepiece"
    config.data.tokenizer.path = ""  # trained from the mixture on first use, T5 conventions
    config.data.tokenizer.vocab_size = 1024  # 924 pieces + 100 sentinel ids
    config.data.tokenizer.train_examples = 20_000

    config.model.family = "t5"
    config.model.vocab_size = 1024
    config.model.d_model = 128
    config.model.n_layers = 2  # encoder
    config.model.n_decoder_layers = 2
    config.model.n_heads = 4
    config.model.head_dim = 32
    config.model.d_ff = 384
    config.model.dropout_rate = 0.0

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
