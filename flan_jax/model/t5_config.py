"""`T5Config`: the encoder-decoder family (T5 v1.1 / FLAN-T5, the original T5, mT5's shape).

One frozen (hashable: NNX keeps it in the static graph jit hashes) dataclass, the T5 counterpart
of the decoder's `ModelConfig`. The variants differ in four switches:

                       gated_mlp  activation  tie_embeddings  scale_decoder_outputs
  T5 v1.1 / FLAN-T5    True       gelu_tanh   False           False
  original T5          False      relu        True            True    (logits of d_model**-0.5 * x)
  mT5                  as v1.1, with a 250k vocabulary
  (transformers 5 builds every new T5 tied: a v1.1 model it saves is tied, unscaled)

Three ways to build one, like ModelConfig:
  T5Config.from_config(config.model)                # an experiment config (config.model.family = "t5")
  T5Config.for_family("t5", d_model=..., ...)       # "t5" = v1.1 / FLAN-T5 switches, "t5_original"
  T5Config.from_hf_config(config_json, tensor_names)  # a Hugging Face T5ForConditionalGeneration folder

The experiment config's `model` section is shared by every family: the decoder fields T5 has no
use for (n_kv_heads, rope_theta, ...) must stay at their defaults, and `n_layers` is the encoder
depth (`n_decoder_layers`, None = the same, is the decoder's), as in Hugging Face's T5Config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

from flan_jax.model.family_config import FamilyConfig

# Fields that say how to run or regularise a model rather than what it is: an experiment config
# may change them for a converted checkpoint (dropout: FLAN-T5 checkpoints ship 0.1, a run may use 0).
T5_RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "attention", "kernels", "scan_layers", "dropout_rate")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


@dataclasses.dataclass(frozen=True)
class T5Config(FamilyConfig):
    family: str = "t5"  # always "t5"; config.model.family "t5_original" presets the original's switches
    vocab_size: int = 32128
    d_model: int = 512
    n_layers: int = 8  # encoder layers
    n_decoder_layers: int = 8
    n_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    relative_buckets: int = 32  # relative position buckets (half per direction in the encoder)
    relative_max_distance: int = 128  # distances >= this share the last bucket
    norm_eps: float = 1e-6
    gated_mlp: bool = True
    activation: str = "gelu_tanh"
    tie_embeddings: bool = False
    scale_decoder_outputs: bool = False  # original T5: the tied head sees d_model**-0.5 * hidden
    dropout_rate: float = 0.0
    init_scale: float = 1.0  # Hugging Face's initializer_factor

    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # none | full | dots
    attention: str = "xla"  # xla = reference (einsum, float32 scores) | cudnn (jax.nn.dot_product_attention)
    # auto | cpu | xla: the projections' matmuls (flan_jax/model/kernels, as the decoder's). T5's
    # attention adds a relative position bias, which the causal CPU attention kernel has no input
    # for, so it is always the einsum (or cudnn) formulation.
    kernels: str = "auto"
    # Each stack's layers stacked and run by one lax.scan (True) or a Python loop (False); None: by
    # the encoder's depth, as the decoder family decides (`scanned`). Changes the parameter layout
    # (`{encoder,decoder}/layers/...` with a leading layer axis, model/layout.py), not the model.
    scan_layers: bool | None = None

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = T5_RUNTIME_FIELDS
    # RMS norm without mean or bias: what the decoder's `Norm` needs to read from a config.
    norm: ClassVar[str] = "rms"
    norm_bias: ClassVar[bool] = False
    norm_scale_plus_one: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.check_choices(family=("t5",), activation=ACTIVATIONS)
        self.check_runtime_choices()
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate={self.dropout_rate} must be in [0, 1)")
        if self.relative_buckets < 4 or self.relative_max_distance < self.relative_buckets // 2:
            raise ValueError(
                f"T5Config: relative_buckets={self.relative_buckets} and relative_max_distance="
                f"{self.relative_max_distance} leave no logarithmic buckets"
            )
        if self.n_layers < 1 or self.n_decoder_layers < 1:
            raise ValueError(f"T5Config: n_layers={self.n_layers}, n_decoder_layers={self.n_decoder_layers} must be >= 1")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> T5Config:
        """The switches of `family` ("t5" = v1.1 / FLAN-T5, "t5_original"), then `overrides`.

        The result's `family` is "t5" either way: "t5_original" only presets switches, the model
        is the same (so a converted original T5 and a config asking for one agree).
        """
        if family not in _FAMILY_DEFAULTS:
            raise ValueError(f"Unknown T5 family {family!r}; expected one of {sorted(_FAMILY_DEFAULTS)}")
        return cls.from_dict({**dataclasses.asdict(cls()), **_FAMILY_DEFAULTS[family], **overrides, "family": "t5"})

    @classmethod
    def from_config(cls, model_section: Any) -> T5Config:
        """From the `config.model` section of an experiment config (family "t5" or "t5_original").

        Fields left at None keep the family's defaults; `n_decoder_layers` None means as many as
        `n_layers`. A field of the decoder family changed from its default is an error naming it
        (it would otherwise be ignored silently).
        """
        from flan_jax.model import registry

        values = registry.family_fields(model_section, cls)
        family = values.pop("family", None) or "t5"
        if values.get("n_decoder_layers") is None and values.get("n_layers") is not None:
            values["n_decoder_layers"] = values["n_layers"]
        return cls.for_family(family, **{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], tensor_names: Collection[str] | None = None, **overrides: Any) -> T5Config:
        """From a Hugging Face T5/mT5 `config.json` dict; `tensor_names` (the safetensors keys)
        decide whether the head is tied (transformers 5 writes `tie_word_embeddings: true` for
        every T5 and ties unless `lm_head.weight` is stored)."""
        return from_hf(cls, hf, tensor_names, **overrides)

    # ------------------------------------------------------------------ what the trainer asks
    def check_data(self, data_config: Any) -> None:
        """Data settings an encoder-decoder cannot train on, refused before any work."""
        if data_config.get("prefix_lm"):
            raise ValueError("config.data.prefix_lm=True is a decoder-only setting: a T5 encoder already sees its inputs bidirectionally")
        if data_config.get("loss_on_inputs"):
            raise ValueError(
                "config.data.loss_on_inputs=True has no meaning for T5: the inputs go to the encoder, which predicts nothing"
            )

    def flops_per_token(self, n_matmul: int, data_config: Any, n_frozen_matmul: int = 0) -> float:
        """Training FLOPs per row position (encoder + decoder positions, padding included).

        6 x (weights each position multiplies: encoder weights for encoder positions, decoder
        weights and the head for decoder positions) + 12 x heads x head_dim x keys per attention
        (encoder self over Le keys, decoder self over Ld keys, cross over Le keys), averaged over
        the Le + Ld positions of a row. The split needs the sizes, so the counts only give the
        frozen share: frozen weights (LoRA's base) cost 4 FLOPs, not 6 (no weight gradient), taken
        as spread over the encoder and decoder like all weights.
        """
        frozen_share = n_frozen_matmul / (n_matmul + n_frozen_matmul) if n_matmul + n_frozen_matmul else 0.0
        le, ld = encoder_length(data_config), decoder_length(data_config)
        d, hd, f = self.d_model, self.n_heads * self.head_dim, self.d_ff * (3 if self.gated_mlp else 2)
        attn = 4 * d * hd
        enc = self.n_layers * (attn + d * f)
        dec = self.n_decoder_layers * (2 * attn + d * f) + d * self.vocab_size
        attention = 12 * hd * (self.n_layers * le * le + self.n_decoder_layers * (ld * ld + ld * le))
        return ((6 - 2 * frozen_share) * (enc * le + dec * ld) + attention) / (le + ld)

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_kv_heads(self) -> int:  # the attention has as many key/value heads as query heads
        return self.n_heads

    @property
    def num_params(self) -> int:
        """Parameter count (shared embedding and head included)."""
        d, inner = self.d_model, self.n_heads * self.head_dim
        attn = 4 * d * inner
        mlp = d * self.d_ff * (3 if self.gated_mlp else 2)
        encoder = self.n_layers * (attn + mlp + 2 * d) + d
        decoder = self.n_decoder_layers * (2 * attn + mlp + 3 * d) + d
        bias = 2 * self.relative_buckets * self.n_heads
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + encoder + decoder + bias + head


_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "t5": dict(gated_mlp=True, activation="gelu_tanh", tie_embeddings=False, scale_decoder_outputs=False),
    "t5_original": dict(gated_mlp=False, activation="relu", tie_embeddings=True, scale_decoder_outputs=True),
}


FAMILIES = tuple(_FAMILY_DEFAULTS)


def encoder_length(data_config: Any) -> int:
    """Encoder row length: `config.data.seq_len`."""
    return int(data_config.seq_len)


def decoder_length(data_config: Any) -> int:
    """Decoder row length: `config.data.targets_len`, or seq_len when it is 0."""
    targets = int(data_config.get("targets_len", 0) or 0)
    return targets or int(data_config.seq_len)


# ---------------------------------------------------------------------- Hugging Face config.json
class UnsupportedT5ConfigError(ValueError):
    """A Hugging Face T5 config this model cannot reproduce exactly."""


HF_MODEL_TYPES = ("t5", "mt5")
_HF_ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
_HF_ACTIVATIONS = {
    "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu",
}
_ACTIVATION_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}
# Keys of other T5-like architectures that change the computation: refused by name.
_REFUSED_KEYS = {
    "is_decoder": False,  # a decoder-only T5 stack
    "is_encoder_decoder": True,
    "tie_encoder_decoder": False,  # encoder and decoder sharing their weights
    "add_cross_attention": False,
}


def from_hf(cls: type[T5Config], hf: Mapping[str, Any], tensor_names: Collection[str] | None = None, **overrides: Any) -> T5Config:
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise UnsupportedT5ConfigError(f"config.json model_type={model_type!r} is not a T5 model type {HF_MODEL_TYPES}")
    architectures = [a for a in hf.get("architectures") or [] if a not in _HF_ARCHITECTURES]
    if architectures:
        raise UnsupportedT5ConfigError(
            f"config.json architectures={hf['architectures']}: only {list(_HF_ARCHITECTURES)} convert "
            "(an encoder-only or classification T5 has another head)"
        )
    for key, supported in _REFUSED_KEYS.items():
        if key in hf and bool(hf[key]) != supported:
            raise UnsupportedT5ConfigError(f"T5 config.json {key}={hf[key]!r} is not supported")
    proj = str(hf.get("feed_forward_proj", "relu" if model_type == "t5" else "gated-gelu"))
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UnsupportedT5ConfigError(f"T5 config.json feed_forward_proj={proj!r} is not 'gated-ACT' or 'ACT'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # as transformers: gated-gelu means the tanh form
    if act not in _HF_ACTIVATIONS:
        raise UnsupportedT5ConfigError(
            f"T5 config.json feed_forward_proj={proj!r}: activation {act!r} is not supported; supported: {sorted(_HF_ACTIVATIONS)}"
        )
    if tensor_names is not None:
        tied = "lm_head.weight" not in tensor_names
    else:
        tied = hf.get("tie_word_embeddings", True) is not False
    if model_type == "mt5":
        scale = False  # transformers' MT5 never rescales
    elif "scale_decoder_outputs" in hf:
        scale = bool(hf["scale_decoder_outputs"])
    else:  # transformers 4 layout: the original T5 ties and rescales, v1.1 configs say tie_word_embeddings=false
        scale = hf.get("tie_word_embeddings", True) is not False
    n_layers = _require(hf, "num_layers")
    fields = dict(
        vocab_size=_require(hf, "vocab_size"),
        d_model=_require(hf, "d_model"),
        n_layers=n_layers,
        n_decoder_layers=hf.get("num_decoder_layers") or n_layers,
        n_heads=_require(hf, "num_heads"),
        head_dim=_require(hf, "d_kv"),
        d_ff=_require(hf, "d_ff"),
        relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        gated_mlp=len(parts) == 2,
        activation=_HF_ACTIVATIONS[act],
        tie_embeddings=tied,
        scale_decoder_outputs=scale,
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        init_scale=float(hf.get("initializer_factor", 1.0)),
    )
    return cls(**{**fields, **overrides})


def _require(hf: Mapping[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise UnsupportedT5ConfigError(f"T5 config.json has no {key!r}")
    return hf[key]


def to_hf(cfg: T5Config, *, dtype: str | None = None, token_ids: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """A transformers `config.json` dict (T5ForConditionalGeneration) for `cfg`."""
    act = _ACTIVATION_TO_HF[cfg.activation]
    if cfg.gated_mlp:
        if cfg.activation == "gelu":
            raise UnsupportedT5ConfigError(
                "A gated FFN with exact GELU cannot be written as a Hugging Face T5 config: "
                "feed_forward_proj='gated-gelu' means the tanh approximation there"
            )
        proj = "gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{act}"
    else:
        proj = act
    hf: dict[str, Any] = dict(
        model_type="t5",
        architectures=["T5ForConditionalGeneration"],
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.head_dim,
        d_ff=cfg.d_ff,
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.n_decoder_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj=proj,
        dropout_rate=cfg.dropout_rate,
        initializer_factor=cfg.init_scale,
        # transformers 4 unties on tie_word_embeddings=false; 5 reads scale_decoder_outputs and unties
        # whenever lm_head.weight is stored (the exporter writes it exactly when untied).
        tie_word_embeddings=cfg.tie_embeddings or cfg.scale_decoder_outputs,
        scale_decoder_outputs=cfg.scale_decoder_outputs,
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dtype=dtype or cfg.param_dtype,
    )
    hf.update({k: v for k, v in (token_ids or {}).items() if v is not None})
    return hf
