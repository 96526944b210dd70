"""Which Hugging Face T5ForConditionalGeneration tensor becomes which T5 parameter (model/t5.py).

Same `Rule`s as the decoder's mapping (exact inverse transposes and reshapes, so a round trip is
bitwise). Hugging Face's layout: `{encoder,decoder}.block.<i>.layer.<j>` where j counts the
sub-layers (encoder: 0 self-attention, 1 feed-forward; decoder: 0 self-attention,
1 cross-attention `EncDecAttention`, 2 feed-forward); the relative position table lives in block 0's
self-attention only. Tensors stored without a parameter of their own: the stacks' copies of the
shared embedding (`{encoder,decoder}.embed_tokens.weight`, tied to `shared.weight` in
transformers) and a cross-attention position table some old checkpoints carry (transformers
ignores it as well).
"""

from __future__ import annotations

from collections.abc import Iterator

from flan_jax.convert.mapping import Rule, linear, same
from flan_jax.model.t5_config import T5Config

_SKIPPED = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)


def skip_tensor(cfg: T5Config, key: str) -> bool:
    del cfg
    return key in _SKIPPED


def rules(cfg: T5Config) -> list[Rule]:
    return list(_rules(cfg))


def _attention(hf: str, ours: tuple, cfg: T5Config) -> Iterator[Rule]:
    d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
    for name in ("q", "k", "v"):
        yield linear(f"{hf}.{name}.weight", (*ours, name, "kernel"), (d, h, hd), 1)
    yield linear(f"{hf}.o.weight", (*ours, "o", "kernel"), (h, hd, d), 2)


def _feed_forward(hf: str, ours: tuple, cfg: T5Config) -> Iterator[Rule]:
    d, f = cfg.d_model, cfg.d_ff
    if cfg.gated_mlp:
        yield linear(f"{hf}.wi_0.weight", (*ours, "gate", "kernel"), (d, f), 1)
        yield linear(f"{hf}.wi_1.weight", (*ours, "up", "kernel"), (d, f), 1)
    else:
        yield linear(f"{hf}.wi.weight", (*ours, "up", "kernel"), (d, f), 1)
    yield linear(f"{hf}.wo.weight", (*ours, "down", "kernel"), (f, d), 1)


def _rules(cfg: T5Config) -> Iterator[Rule]:
    yield same("shared.weight", ("embed",))
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        yield same(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (stack, "rel_bias"))
        for i in range(n_layers):
            hf, ours = f"{stack}.block.{i}.layer", (stack, "layers", i)
            yield same(f"{hf}.0.layer_norm.weight", (*ours, "attn_norm", "scale"))
            yield from _attention(f"{hf}.0.SelfAttention", (*ours, "attn"), cfg)
            ff = 1
            if stack == "decoder":
                yield same(f"{hf}.1.layer_norm.weight", (*ours, "cross_norm", "scale"))
                yield from _attention(f"{hf}.1.EncDecAttention", (*ours, "cross_attn"), cfg)
                ff = 2
            yield same(f"{hf}.{ff}.layer_norm.weight", (*ours, "mlp_norm", "scale"))
            yield from _feed_forward(f"{hf}.{ff}.DenseReluDense", (*ours, "mlp"), cfg)
        yield same(f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"))
    if not cfg.tie_embeddings:
        yield linear("lm_head.weight", ("lm_head",), (cfg.d_model, cfg.vocab_size), 1)
