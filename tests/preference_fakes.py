"""Shared by the preference tests: tiny random HF Llamas (policy + reference), random token pairs, packed pair rows.

Everything is built offline from configs; the same weights feed transformers/trl and our model.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flan_jax.convert import checkpoint
from flan_jax.data.converters.pairs import build_pair_features, build_pair_row
from flan_jax.data.features import FeatureConfig

VOCAB = 96
BOS, EOS, PAD = 1, 2, 0
LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)


def randomize(model, seed: int) -> None:
    """Weights large enough that a wrong reduction or mask cannot hide below the tolerance."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def hf_llama(seed: int, kind: str = "causal"):
    """A tiny random Llama: `LlamaForCausalLM` or ("reward") `LlamaForSequenceClassification` (num_labels=1)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**LLAMA_SIZES, num_labels=1)
    cls = transformers.LlamaForCausalLM if kind == "causal" else transformers.LlamaForSequenceClassification
    model = cls(config).eval()
    randomize(model, seed)
    return model


def our_params(hf_model, directory: pathlib.Path):
    """(ModelConfig, nested params) of an HF causal LM through our importer."""
    from flan_jax import convert

    hf_model.save_pretrained(directory)
    cfg, flat = convert.load_hf_params(directory)
    return cfg.replace(attention="reference"), checkpoint.nest({p: jnp.asarray(v) for p, v in flat.items()})


def our_model(cfg, params):
    from flan_jax import model as fm

    model = nnx.eval_shape(lambda: fm.Transformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def random_pairs(n: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token lists of varied lengths (no special ids)."""
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(4, VOCAB, k).tolist()  # noqa: E731
    pairs = []
    for _ in range(n):
        chosen, rejected = ids(int(rng.integers(1, 7))), ids(int(rng.integers(1, 7)))
        pairs.append((ids(int(rng.integers(2, 9))), chosen, rejected))
    return pairs


def pair_features(pairs, seq_len: int = 96) -> list[dict]:
    config = FeatureConfig(seq_len=seq_len)
    out = []
    for prompt, chosen, rejected in pairs:
        features, _ = build_pair_features(prompt, chosen, rejected, bos_id=BOS, eos_id=EOS, config=config)
        out.append(features)
    return out


def packed_batch(pairs, *, pairs_per_row: int, seq_len: int = 96) -> dict[str, np.ndarray]:
    """Pairs packed `pairs_per_row` to a row, in order (the pair of index i is row i // k, column i % k)."""
    features = pair_features(pairs, seq_len)
    rows = [build_pair_row(features[i:i + pairs_per_row], seq_len) for i in range(0, len(features), pairs_per_row)]
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def trl_examples(pairs) -> list[dict]:
    """The same pairs in trl's tokenized preference format (BOS in the prompt, EOS closing each response)."""
    return [{"prompt_ids": [BOS, *p], "chosen_ids": [*c, EOS], "rejected_ids": [*r, EOS]} for p, c, r in pairs]


def hf_tokenizer(directory: pathlib.Path):
    """A word-level `PreTrainedTokenizerFast` over "t0".."t95" (trl's trainers need one to start)."""
    import tokenizers
    import transformers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"t{i}": i for i in range(3, VOCAB)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t3"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    path = directory / "tokenizer.json"
    model.save(str(path))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="t3"
    )


def as_text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)
