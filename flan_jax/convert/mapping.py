"""Which Hugging Face tensor becomes which of our parameters, and how.

A `Rule` links one or more HF tensors to one or more of our parameters with a pair of exact
inverse functions (transpose, reshape, split/concatenate; no arithmetic), so converting there
and back is bitwise. Layout facts:

- torch `nn.Linear` weights are [out, in]; ours are [in, out] with the head structure kept
  (q: [embed, heads, head_dim], o: [heads, head_dim, embed]).
- GPT-2's `Conv1D` weights are already [in, out], and its q, k, v live in one `c_attn` tensor;
  Phi-3's q, k, v live in one `qkv_proj` and its gate and up projections in one `gate_up_proj`.
- Tied models have no `lm_head.weight` (transformers 5 saves tied weights once).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from flan_jax.model.config import ModelConfig

Path = tuple  # a parameter path in the params pure dict, e.g. ("layers", 0, "attn", "q", "kernel")
Arrays = list[np.ndarray]

# HF tensors that are buffers, not parameters: safe to skip on import (logged).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Rule:
    hf_keys: tuple[str, ...]
    paths: tuple[Path, ...]
    to_ours: Callable[[Arrays], Arrays]
    to_hf: Callable[[Arrays], Arrays]


def _one(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[Arrays], Arrays]:
    return lambda arrays: [np.ascontiguousarray(f(arrays[0]))]


def same(hf_key: str, path: Path) -> Rule:
    """The same array on both sides (norm scales, biases, embeddings, Conv1D weights)."""
    return Rule((hf_key,), (path,), _one(lambda a: a), _one(lambda a: a))


def linear(hf_key: str, path: Path, shape: Sequence[int], n_in: int) -> Rule:
    """torch Linear [out, in] <-> our kernel `shape` whose first `n_in` dims are the inputs."""
    n_in_size = math.prod(shape[:n_in])
    return Rule(
        (hf_key,), (path,),
        _one(lambda w: w.T.reshape(shape)),
        _one(lambda k: k.reshape(n_in_size, -1).T),
    )


def reshaped(hf_key: str, path: Path, hf_shape: Sequence[int], shape: Sequence[int]) -> Rule:
    """Same memory order, different shape (biases split per head, Conv1D weights)."""
    return Rule((hf_key,), (path,), _one(lambda a: a.reshape(shape)), _one(lambda a: a.reshape(hf_shape)))


def rules(cfg: ModelConfig) -> list[Rule]:
    return list(_gpt2_rules(cfg) if cfg.family == "gpt2" else _llama_rules(cfg))


def skip_tensor(cfg: ModelConfig, key: str) -> bool:
    """Stored tensors with no parameter: buffers and the duplicate head of a tied model."""
    return key.endswith(IGNORED_SUFFIXES) or (cfg.tie_embeddings and key == "lm_head.weight")


def canonical_key(cfg: ModelConfig, key: str) -> str:
    """GPT-2 checkpoints saved from `GPT2Model` (e.g. the original release) lack "transformer."."""
    if cfg.family == "gpt2" and not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key


# Our block norms -> the HF name of each, by `block_norms` (Llama's "post_attention_layernorm" is the
# norm *before* the MLP; Gemma 2/3's and OLMo 2's is the one after attention).
_NORM_NAMES = {
    "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "sandwich": {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    "post": {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
}


def fused(hf_key: str, paths: Sequence[Path], shapes: Sequence[Sequence[int]]) -> Rule:
    """One torch Linear [sum of outs, in] <-> several of our kernels [in, *out_i] (Phi-3's qkv_proj
    and gate_up_proj: the outputs concatenated in `paths` order)."""
    sizes = [math.prod(shape[1:]) for shape in shapes]
    splits = list(np.cumsum(sizes)[:-1])
    return Rule(
        (hf_key,), tuple(paths),
        lambda a: [np.ascontiguousarray(w.T.reshape(shape)) for w, shape in zip(np.split(a[0], splits, axis=0), shapes)],
        lambda a: [np.concatenate([k.reshape(k.shape[0], -1).T for k in a], axis=0)],
    )


def _llama_rules(cfg: ModelConfig) -> Iterator[Rule]:
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    yield same("model.embed_tokens.weight", ("embed",))
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        for norm, hf_norm in _NORM_NAMES[cfg.block_norms].items():
            yield same(hf + f"{hf_norm}.weight", (*ours, norm, "scale"))
        qkv = {"q": h, "k": kv, "v": kv}
        if cfg.family == "phi3":
            yield fused(hf + "self_attn.qkv_proj.weight", [(*ours, "attn", n, "kernel") for n in qkv],
                        [(d, heads, hd) for heads in qkv.values()])
        for name, heads in qkv.items():
            if cfg.family != "phi3":
                yield linear(hf + f"self_attn.{name}_proj.weight", (*ours, "attn", name, "kernel"), (d, heads, hd), 1)
            if cfg.qkv_bias:
                yield reshaped(hf + f"self_attn.{name}_proj.bias", (*ours, "attn", name, "bias"), (heads * hd,), (heads, hd))
        if cfg.qk_norm == "head":  # one scale over head_dim, shared by the heads
            for name in ("q", "k"):
                yield same(hf + f"self_attn.{name}_norm.weight", (*ours, "attn", f"{name}_norm", "scale"))
        elif cfg.qk_norm == "full":  # OLMo 2: over all heads' features at once
            for name, heads in (("q", h), ("k", kv)):
                yield reshaped(hf + f"self_attn.{name}_norm.weight", (*ours, "attn", f"{name}_norm", "scale"),
                               (heads * hd,), (heads, hd))
        yield linear(hf + "self_attn.o_proj.weight", (*ours, "attn", "o", "kernel"), (h, hd, d), 2)
        if cfg.out_bias:
            yield same(hf + "self_attn.o_proj.bias", (*ours, "attn", "o", "bias"))
        if cfg.family == "phi3":  # gate_up_proj: [gate | up] along the output
            yield fused(hf + "mlp.gate_up_proj.weight", [(*ours, "mlp", n, "kernel") for n in ("gate", "up")], [(d, f), (d, f)])
        for name, shape in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
            if cfg.family != "phi3" or name == "down":
                yield linear(hf + f"mlp.{name}_proj.weight", (*ours, "mlp", name, "kernel"), shape, 1)
            if cfg.mlp_bias:
                yield same(hf + f"mlp.{name}_proj.bias", (*ours, "mlp", name, "bias"))
    yield same("model.norm.weight", ("final_norm", "scale"))
    if not cfg.tie_embeddings:
        yield linear("lm_head.weight", ("lm_head",), (d, cfg.vocab_size), 1)


def _gpt2_rules(cfg: ModelConfig) -> Iterator[Rule]:
    d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
    yield same("transformer.wte.weight", ("embed",))
    yield same("transformer.wpe.weight", ("pos_embed",))
    for i in range(cfg.n_layers):
        hf, ours = f"transformer.h.{i}.", ("layers", i)
        for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            yield same(hf + f"{hf_norm}.weight", (*ours, norm, "scale"))
            yield same(hf + f"{hf_norm}.bias", (*ours, norm, "bias"))
        qkv = tuple((*ours, "attn", name) for name in ("q", "k", "v"))
        # c_attn: [d, 3 * h * hd] = [q | k | v] along the output dimension.
        yield Rule(
            (hf + "attn.c_attn.weight",), tuple((*p, "kernel") for p in qkv),
            lambda a: [np.ascontiguousarray(x.reshape(d, h, hd)) for x in np.split(a[0], 3, axis=1)],
            lambda a: [np.concatenate([x.reshape(d, h * hd) for x in a], axis=1)],
        )
        yield Rule(
            (hf + "attn.c_attn.bias",), tuple((*p, "bias") for p in qkv),
            lambda a: [np.ascontiguousarray(x.reshape(h, hd)) for x in np.split(a[0], 3)],
            lambda a: [np.concatenate([x.reshape(-1) for x in a])],
        )
        yield reshaped(hf + "attn.c_proj.weight", (*ours, "attn", "o", "kernel"), (h * hd, d), (h, hd, d))  # Conv1D: [in, out]
        for hf_name, path in (("attn.c_proj.bias", ("attn", "o", "bias")), ("mlp.c_fc.weight", ("mlp", "up", "kernel")),
                              ("mlp.c_fc.bias", ("mlp", "up", "bias")), ("mlp.c_proj.weight", ("mlp", "down", "kernel")),
                              ("mlp.c_proj.bias", ("mlp", "down", "bias"))):
            yield same(hf + hf_name, (*ours, *path))
    yield same("transformer.ln_f.weight", ("final_norm", "scale"))
    yield same("transformer.ln_f.bias", ("final_norm", "bias"))
    if not cfg.tie_embeddings:
        yield linear("lm_head.weight", ("lm_head",), (d, cfg.vocab_size), 1)  # an nn.Linear, unlike Conv1D
