"""Tiny random T5 models built offline with transformers, and our T5 holding the same weights.

Shared by the T5 tests (model parity, conversion, generation, benchmarks' smoke checks). The
variants cover every switch the importer reads:

  flan_t5       gated-GELU, untied head stored as lm_head.weight, no rescale (the FLAN-T5 / v1.1 hub layout)
  v11_tied      gated-GELU, tied without rescale (what transformers 5 saves for a v1.1 model it built)
  t5_original   ReLU FFN, tied head with the d_model**-0.5 rescale (t5-small ... t5-11b)
  mt5           MT5ForConditionalGeneration (gated-GELU, untied, a larger vocabulary)
"""

from __future__ import annotations

import numpy as np

VOCAB = 96
SIZES = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)


def build_hf(name: str):
    """A transformers model of variant `name` with weights large enough to expose any mistake."""
    import torch
    import transformers

    torch.manual_seed(0)
    if name == "mt5":
        model = transformers.MT5ForConditionalGeneration(transformers.MT5Config(vocab_size=3 * VOCAB, **SIZES))
    elif name == "t5_original":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=VOCAB, **SIZES))
    else:
        config = transformers.T5Config(vocab_size=VOCAB, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **SIZES)
        model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "layer_norm" in param_name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
        if name in ("flan_t5", "mt5"):  # a separate head, as the hub checkpoints have
            model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn_like(model.shared.weight))
    return model.eval()


def random_ids(shape, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    """Token ids avoiding PAD (0) and EOS (1)."""
    return np.random.default_rng(seed).integers(2, vocab, shape).astype(np.int32)


def hf_logits(model, encoder_ids, decoder_ids, encoder_mask=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {} if encoder_mask is None else {"attention_mask": torch.as_tensor(encoder_mask)}
        out = model(input_ids=torch.as_tensor(encoder_ids, dtype=torch.long),
                    decoder_input_ids=torch.as_tensor(decoder_ids, dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def ours_from_hf(hf_model, **overrides):
    """(T5Config, our T5 model) holding `hf_model`'s weights, through the converter's rules."""
    import jax.numpy as jnp
    from flax import nnx

    from flan_jax.convert import checkpoint, t5_mapping
    from flan_jax.model.t5 import T5
    from flan_jax.model.t5_config import T5Config

    tensors = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    if hf_model.lm_head.weight.data_ptr() == hf_model.shared.weight.data_ptr():
        tensors.pop("lm_head.weight", None)  # a tied model stores the head once
    cfg = T5Config.from_hf_config(hf_model.config.to_dict(), set(tensors), **overrides)
    flat = {}
    for rule in t5_mapping.rules(cfg):
        flat.update(zip(rule.paths, rule.to_ours([tensors[k] for k in rule.hf_keys])))
    model = nnx.eval_shape(lambda: T5(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpoint.nest({tuple(str(k) for k in p): jnp.asarray(v) for p, v in flat.items()}))
    nnx.update(model, state)
    return cfg, model


def logits(model, **features) -> np.ndarray:
    """`model(**features)` compiled once per shape (eager T5 runs op by op, seconds per call)."""
    return np.asarray(_jitted_logits(model, features))


def _jitted_logits(model, features):
    from flax import nnx

    global _JITTED
    if _JITTED is None:
        _JITTED = nnx.jit(lambda m, f: m(**f))
    return _JITTED(model, features)


_JITTED = None


def with_config(model, cfg):
    """A T5 of `cfg` (e.g. another attention or dropout) holding `model`'s weights, built abstractly."""
    from flax import nnx

    from flan_jax.model.t5 import T5

    other = nnx.eval_shape(lambda: T5(cfg, rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(model, nnx.Param))
    return other


def packed_rows(examples, enc_len: int, dec_len: int):
    """(encoder, decoder) pairs of id arrays packed into one row the t5x way, as a feature dict."""
    from flan_jax.data.converters import ENCDEC

    features = []
    for enc, dec in examples:
        features.append({
            "encoder_input_tokens": np.asarray(enc, np.int32),
            "decoder_input_tokens": np.asarray(dec, np.int32),
            "decoder_target_tokens": np.asarray(dec, np.int32),
            "decoder_loss_weights": np.ones(len(dec), np.float32),
        })
    row = ENCDEC.build_row(features, (enc_len, dec_len))
    return {k: v[None] for k, v in row.items()}


# ---------------------------------------------------------------------- trainer runs
# configs/flan_t5_demo.py shrunk to a model and batch that train in milliseconds per step on CPU.
def _tiny_t5_demo() -> dict:
    """The decoder's tiny demo settings (tests/train_fakes.py) with T5's model and rows."""
    from tests import train_fakes

    decoder_only = ("model.n_kv_heads", "model.max_positions")
    return {
        **{k: v for k, v in train_fakes.TINY_DEMO.items() if k not in decoder_only},
        "data.seq_len": 48,
        "data.targets_len": 16,
        "data.tokenizer.vocab_size": 500,  # 400 pieces + 100 sentinels
        "model.vocab_size": 512,
        "model.n_decoder_layers": 1,
        "model.relative_buckets": 8,
        "model.relative_max_distance": 32,
    }


TINY_T5_DEMO = _tiny_t5_demo()


def t5_demo_overrides(tokenizer_path, **overrides) -> dict:
    """TINY_T5_DEMO plus `overrides` (keys with "__" for dots)."""
    from tests import train_fakes

    return train_fakes.demo_overrides(tokenizer_path, base=TINY_T5_DEMO, **overrides)


def t5_demo_config(overrides: dict):
    from tests import train_fakes

    return train_fakes.demo_config(overrides, config_file="flan_t5_demo.py")


def train_t5_tokenizer(directory):
    """A small T5-convention sentencepiece model of the demo mixture (pad 0, EOS 1, unk 2, sentinels)."""
    from flan_jax.data import tokenizer as tokenizer_lib

    path = directory / "tokenizer.model"
    if not path.exists():
        config = t5_demo_config(t5_demo_overrides(""))
        tokenizer_lib.load_tokenizer(config.data.tokenizer, workdir=directory, train_mixture=config.data.train_mixture,
                                     convention="t5")
    return path


def random_packed_batch(seed: int, rows: int = 8, enc_len: int = 16, dec_len: int = 8, vocab: int = 64) -> dict:
    """An "encdec" batch of 1-3 random examples per row (some padding in both streams)."""
    from flan_jax.data.converters import ENCDEC

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        examples, enc_free, dec_free = [], enc_len, dec_len
        for _ in range(rng.integers(1, 4)):
            n, m = int(rng.integers(2, enc_len // 2)), int(rng.integers(2, dec_len // 2 + 1))
            if n > enc_free or m > dec_free:
                break
            targets = rng.integers(2, vocab, m).astype(np.int32)
            examples.append({
                "encoder_input_tokens": rng.integers(2, vocab, n).astype(np.int32),
                "decoder_target_tokens": targets,
                "decoder_input_tokens": np.concatenate([[0], targets[:-1]]).astype(np.int32),
                "decoder_loss_weights": (rng.random(m) < 0.8).astype(np.float32),
            })
            enc_free, dec_free = enc_free - n, dec_free - m
        out.append(ENCDEC.build_row(examples, (enc_len, dec_len)))
    return {key: np.stack([row[key] for row in out]) for key in ENCDEC.batch_keys}
