"""Hugging Face `config.json` <-> `ModelConfig`, for the families the transformer covers.

Reads both the transformers 4 layout (`rope_theta`, `rope_scaling`) and the transformers 5 layout
(`rope_parameters`, per layer type for Gemma 3). Anything the model cannot reproduce exactly
(another rope type, Phi-3's longrope, partial rotary, Gemma's bidirectional attention, GPT-2's
inverse-layer-index scaling, ...) is refused with the field named, rather than converted into a
model that silently computes something else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flan_jax.model.config import RUNTIME_FIELDS, ModelConfig

# family -> (config.json model_type, architecture class)
_HF_NAMES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "olmo2": ("olmo2", "Olmo2ForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
}
_FAMILY_OF = {model_type: family for family, (model_type, _) in _HF_NAMES.items()}
MODEL_TYPES = tuple(_FAMILY_OF)  # config.json model_type values the decoder family reads
_GEMMAS = ("gemma", "gemma2", "gemma3")
_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
_ACTIVATION_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_LAYER_TYPE_OF = {"full_attention": "full", "sliding_attention": "sliding"}
_LAYER_TYPE_TO_HF = {v: k for k, v in _LAYER_TYPE_OF.items()}


class UnsupportedConfigError(ValueError):
    """A Hugging Face config this model cannot reproduce exactly."""


def from_hf(cls: type[ModelConfig], hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    family = _FAMILY_OF.get(hf.get("model_type"))
    if family is None:
        raise UnsupportedConfigError(
            f"config.json model_type={hf.get('model_type')!r} is not supported; supported: {sorted(_FAMILY_OF)}"
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


def _rope_fields(params: Mapping[str, Any], hf: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedConfigError(f"config.json partial_rotary_factor={params.get('partial_rotary_factor')} "
                                     "(rotary embeddings on part of each head) is not supported")
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
    raise UnsupportedConfigError(f"config.json rope type {rope_type!r}{where} is not supported (default, linear, llama3)")


def _rope_params(hf: Mapping[str, Any]) -> dict[str, Any]:
    return {**dict(hf.get("rope_scaling") or {}), **dict(hf.get("rope_parameters") or {})}


def _gemma3_rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3: full layers use rope_parameters["full_attention"] (maybe scaled), sliding ones a local base."""
    params = dict(hf.get("rope_parameters") or {})
    full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    if not full and "rope_type" in params:  # a flat dict: the same rope for every layer
        full = local = params
    fields = _rope_fields(full, hf, " (full_attention layers)")
    local_fields = _rope_fields(local, {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}, " (sliding_attention layers)")
    if local_fields.get("rope_scaling", "none") != "none":
        raise UnsupportedConfigError("config.json rope scaling on Gemma 3's sliding_attention layers is not supported")
    return {**fields, "local_rope_theta": local_fields["rope_theta"]}


def _attention_fields(family: str, hf: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    """Sliding windows (all layers, or per `layer_types`), soft-capping and query scaling."""
    fields: dict[str, Any] = {}
    window = int(hf.get("sliding_window") or 0)
    if family in ("mistral", "phi3"):
        fields["sliding_window"] = window  # every layer
    elif family in ("qwen2", "qwen3", "gemma2", "gemma3"):
        sliding_enabled = family not in ("qwen2", "qwen3") or bool(hf.get("use_sliding_window"))
        types = list(hf.get("layer_types") or [])
        if family in ("qwen2", "qwen3") and sliding_enabled and not types:
            max_window = int(hf.get("max_window_layers", n_layers))
            types = ["sliding_attention" if i >= max_window else "full_attention" for i in range(n_layers)]
        unknown = sorted(set(types) - set(_LAYER_TYPE_OF))
        if unknown:
            raise UnsupportedConfigError(f"config.json layer_types {unknown} are not supported ({sorted(_LAYER_TYPE_OF)})")
        ours = tuple(_LAYER_TYPE_OF[t] for t in types) if sliding_enabled and window else ()
        if ours and len(ours) != n_layers:
            raise UnsupportedConfigError(f"config.json layer_types has {len(ours)} entries for {n_layers} layers")
        if "sliding" in ours:
            fields.update(sliding_window=window, layer_types=ours)
    if family in ("gemma2", "gemma3"):
        fields["attn_softcap"] = float(hf.get("attn_logit_softcapping") or 0.0)
        fields["final_softcap"] = float(hf.get("final_logit_softcapping") or 0.0)
        fields["query_scale"] = float(_require(hf, "query_pre_attn_scalar"))
    return fields


def _llama_like_fields(family: str, hf: Mapping[str, Any]) -> dict[str, Any]:
    d_model = _require(hf, "hidden_size")
    n_heads = _require(hf, "num_attention_heads")
    n_layers = _require(hf, "num_hidden_layers")
    if family in _GEMMAS and hf.get("use_bidirectional_attention"):
        raise UnsupportedConfigError("config.json use_bidirectional_attention=true (Gemma's bidirectional, "
                                     "embedding-model attention) is not supported: the model is causal")
    act = hf.get("hidden_activation") or hf.get("hidden_act") if family in _GEMMAS else hf.get("hidden_act")
    if family in _GEMMAS and act in (None, "gelu"):
        act = "gelu_pytorch_tanh"  # as transformers 5: Gemma's legacy "gelu" means the tanh approximation
    fields = dict(
        vocab_size=_require(hf, "vocab_size"),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        d_ff=_require(hf, "intermediate_size"),
        max_positions=hf.get("max_position_embeddings", 2048),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=_activation(act or "silu"),
        **(_gemma3_rope_fields(hf) if family == "gemma3" else _rope_fields(_rope_params(hf), hf)),
        **_attention_fields(family, hf, n_layers),
    )
    if "tie_word_embeddings" in hf:
        fields["tie_embeddings"] = bool(hf["tie_word_embeddings"])
    if family in ("llama", "mistral", "qwen3", "olmo2", *_GEMMAS):
        fields["qkv_bias"] = fields["out_bias"] = bool(hf.get("attention_bias", False))
    if family == "llama":
        fields["mlp_bias"] = bool(hf.get("mlp_bias", False))
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


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_positions,
        )
    return rope


def to_hf(cfg: ModelConfig, *, dtype: str | None = None, token_ids: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """A transformers 5 `config.json` dict for `cfg`; refuses configs HF's class cannot express."""
    token_ids = dict(token_ids or {})
    dtype = dtype or cfg.param_dtype
    model_type, architecture = _HF_NAMES[cfg.family]
    if cfg.family == "gpt2":
        hf: dict[str, Any] = dict(
            model_type="gpt2", vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_positions,
            layer_norm_epsilon=cfg.norm_eps, activation_function={"gelu_tanh": "gelu_new"}.get(cfg.activation, cfg.activation),
            tie_word_embeddings=cfg.tie_embeddings, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
        )
    else:
        rope = _rope_to_hf(cfg)
        if cfg.family == "gemma3":
            rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}}
        hf = dict(
            model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_positions,
            rms_norm_eps=cfg.norm_eps, hidden_act=_ACTIVATION_TO_HF[cfg.activation], rope_parameters=rope,
            tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
        )
        if cfg.family in ("llama", "mistral", "qwen3", "olmo2", *_GEMMAS):
            hf["attention_bias"] = cfg.qkv_bias
        if cfg.family == "llama":
            hf["mlp_bias"] = cfg.mlp_bias
        if cfg.family in ("mistral", "phi3"):
            hf["sliding_window"] = cfg.sliding_window or None
        if cfg.family in ("qwen2", "qwen3", "gemma2", "gemma3"):
            types = cfg.layer_types or ("full",) * cfg.n_layers
            # Gemma's classes need a window even when no layer slides (it is unused then).
            window = cfg.sliding_window or (cfg.max_positions if cfg.family in _GEMMAS else None)
            hf.update(sliding_window=window, layer_types=[_LAYER_TYPE_TO_HF[t] for t in types])
            if cfg.family in ("qwen2", "qwen3"):
                hf.update(use_sliding_window="sliding" in types, max_window_layers=cfg.n_layers)
        if cfg.family in _GEMMAS:
            hf.update(hidden_activation=hf["hidden_act"], use_bidirectional_attention=False)
        if cfg.family in ("gemma2", "gemma3"):
            scale = cfg.query_scale or cfg.head_dim
            hf.update(query_pre_attn_scalar=int(scale) if float(scale).is_integer() else scale,
                      attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.final_softcap or None)
        if cfg.family == "phi3":
            hf.update(resid_pdrop=0.0, embd_pdrop=0.0, original_max_position_embeddings=cfg.max_positions)
    # Token ids the caller does not know are written as null: a config class's own defaults (Phi-3's
    # pad_token_id=32000) may lie outside this model's vocabulary.
    hf.update(architectures=[architecture], dtype=dtype, **{**{f"{r}_token_id": None for r in ("bos", "eos", "pad")},
                                                              **token_ids})
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
