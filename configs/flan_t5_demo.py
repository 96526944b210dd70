"""The embedded demo with the encoder-decoder family: a tiny T5 (v1.1 / FLAN-T5 layout) tuned on the
built-in synthetic FLAN mixture with everything else as in configs/demo.py (mixture, optimizer,
steps, the same evaluation: held-out templates and the held-out cluster), so the two families can
be compared on the same tasks.

    python -m flan_jax.train --config=configs/flan_t5_demo.py --workdir=/tmp/t5_demo

Sizes: about the decoder demo's parameter count (1.25M vs 1.05M: 2 encoder + 2 decoder layers of
width 128 against 4 decoder layers); docs/training.md compares the two runs. The tokenizer is trained
into the workdir with T5's special ids (pad 0 = decoder start, EOS 1, unk 2, 100 sentinels).
"""

import importlib.util
import pathlib

from flan_jax import default_config


def _decoder_demo():
    spec = importlib.util.spec_from_file_location("demo_config", pathlib.Path(__file__).with_name("demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    config = _decoder_demo()
    defaults = default_config.get_config()

    config.data.seq_len = 256  # encoder rows: the instructions
    config.data.targets_len = 64  # decoder rows: the (short) responses of the synthetic tasks
    config.data.tokenizer.vocab_size = 1024  # 924 pieces + 100 sentinel ids

    config.model = defaults.model  # leave the decoder demo's decoder-only fields behind
    config.model.family = "t5"
    config.model.vocab_size = 1024
    config.model.d_model = 128
    config.model.n_layers = 2  # encoder
    config.model.n_decoder_layers = 2
    config.model.n_heads = 4
    config.model.head_dim = 32
    config.model.d_ff = 384
    config.model.dropout_rate = 0.0
    return config
