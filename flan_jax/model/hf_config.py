"""Hugging Face `config.json` <-> `ModelConfig`, for the families the transformer covers.

Reads both the transformers 4 layout (`rope_theta`, `rope_scaling`) and the transformers 5 layout
(`rope_parameters`). Anything the model cannot reproduce exactly (another rope type, Qwen2's
per-layer sliding window, GPT-2's inverse-layer-index scaling, ...) is refused with the field
named, rather than converted into a model that silently computes something else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flan_jax.model.config import RUNTIME_FIELDS, ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
_ACTIVATION_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


class UnsupportedConfigError(ValueError):
    """A Hugging Face config this model cannot reproduce exactly."""


def from_hf(cls: type[ModelConfig], hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise UnsupportedConfigError(
            f"config.json model_type={family!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    fields = _gpt2_fields(hf) if family == "gpt2" else _llama_like_fields(family, hf)
    return cls.for_family(family, **{**fields, **overrides})


def _require(hf: Mapping[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise UnsupportedConfigError(f"config.json has no {key!r}")
    return hf[key]


def _activation(name: str | None) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedConfigError(f"config.json activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    params = {**legacy, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        return fields
    if rope_type == "linear":
        return {**fields, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if rope_type == "llama3":
        return {
            **fields,
            "rope_scaling": "llama3",
            "rope_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_positions": int(params["original_max_position_embeddings"]),
        }
    raise UnsupportedConfigError(f"config.json rope type {rope_type!r} is not supported (default, linear, llama3)")


def _llama_like_fields(family: str, hf: Mapping[str, Any]) -> dict[str, Any]:
    d_model = _require(hf, "hidden_size")
    n_heads = _require(hf, "num_attention_heads")
    act = hf.get("hidden_act")
    if family == "gemma" and act in (None, "gelu"):
        act = "gelu_pytorch_tanh"  # as transformers 5: Gemma's legacy "gelu" means the tanh approximation
    fields = dict(
        vocab_size=_require(hf, "vocab_size"),
        d_model=d_model,
        n_layers=_require(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        d_ff=_require(hf, "intermediate_size"),
        max_positions=hf.get("max_position_embeddings", 2048),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=_activation(act or ("gelu_pytorch_tanh" if family == "gemma" else "silu")),
        **_rope_fields(hf),
    )
    if "tie_word_embeddings" in hf:
        fields["tie_embeddings"] = bool(hf["tie_word_embeddings"])
    if family in ("llama", "gemma", "mistral"):
        fields["qkv_bias"] = fields["out_bias"] = bool(hf.get("attention_bias", False))
        fields["mlp_bias"] = bool(hf.get("mlp_bias", False))
    if family == "mistral":
        fields["sliding_window"] = int(hf.get("sliding_window") or 0)
    if family == "qwen2":
        sliding = hf.get("use_sliding_window") and any(t == "sliding_attention" for t in hf.get("layer_types") or ["sliding_attention"])
        if sliding:
            raise UnsupportedConfigError("Qwen2 config.json use_sliding_window=true (per-layer sliding window) is not supported")
    return fields


def _gpt2_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True), ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise UnsupportedConfigError(f"GPT-2 config.json {key}={hf[key]!r} is not supported")
    d_model, n_heads = _require(hf, "n_embd"), _require(hf, "n_head")
    fields = dict(
        vocab_size=_require(hf, "vocab_size"),
        d_model=d_model,
        n_layers=_require(hf, "n_layer"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_positions=_require(hf, "n_positions"),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(hf.get("activation_function", "gelu_new")),
    )
    if "tie_word_embeddings" in hf:
        fields["tie_embeddings"] = bool(hf["tie_word_embeddings"])
    return fields


def to_hf(cfg: ModelConfig, *, dtype: str | None = None, token_ids: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """A transformers 5 `config.json` dict for `cfg`; refuses configs HF's class cannot express."""
    token_ids = dict(token_ids or {})
    dtype = dtype or cfg.param_dtype
    if cfg.family == "gpt2":
        hf: dict[str, Any] = dict(
            model_type="gpt2", vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_positions,
            layer_norm_epsilon=cfg.norm_eps, activation_function={"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
            tie_word_embeddings=cfg.tie_embeddings, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
        )
    else:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling == "linear":
            rope.update(rope_type="linear", factor=cfg.rope_factor)
        elif cfg.rope_scaling == "llama3":
            rope.update(
                rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_positions,
            )
        hf = dict(
            model_type=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_positions,
            rms_norm_eps=cfg.norm_eps, hidden_act=_ACTIVATION_TO_HF[cfg.activation], rope_parameters=rope,
            tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
        )
        if cfg.family in ("llama", "gemma", "mistral"):
            hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if cfg.family == "mistral":
            hf["sliding_window"] = cfg.sliding_window or None
        if cfg.family == "qwen2":
            hf.update(use_sliding_window=False, sliding_window=None)
    hf.update(architectures=[ARCHITECTURES[cfg.family]], dtype=dtype, **token_ids)
    _check_round_trip(cfg, hf)
    return hf


def _check_round_trip(cfg: ModelConfig, hf: Mapping[str, Any]) -> None:
    """The HF config must describe exactly this model (e.g. a Qwen2 with an output bias cannot)."""
    back = from_hf(ModelConfig, hf, **{name: getattr(cfg, name) for name in RUNTIME_FIELDS}, init_std=cfg.init_std)
    differing = {k: (v, getattr(back, k)) for k, v in cfg.to_dict().items() if getattr(back, k) != v}
    if differing:
        raise UnsupportedConfigError(
            f"ModelConfig cannot be written as a Hugging Face {cfg.family} config; "
            f"these fields would change (ours, HF's): {differing}"
        )
