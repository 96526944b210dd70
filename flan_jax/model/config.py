"""`ModelConfig`: every architecture switch of the one decoder-only transformer.

One frozen (hashable) dataclass describes Llama 2/3, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2
and GPT-2: they differ only in a handful of switches (norm kind and placement, QK-norm, MLP gating
and activation, position encoding, biases, embedding scaling, soft-capping, per-layer attention
kinds, tied head). `for_family` fills the switches of a family; sizes come from the
caller. The dataclass is frozen because NNX keeps it in the module's static graph definition,
which `jax.jit` hashes.

Three ways to build one:
  ModelConfig.from_config(config.model)     # the ml_collections section of an experiment config
  ModelConfig.for_family("gemma", d_model=..., ...)
  ModelConfig.from_hf_config(json.load(open("config.json")))   # a Hugging Face checkpoint
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from flan_jax.model.family_config import SCAN_MIN_LAYERS, FamilyConfig, default_scan_layers  # noqa: F401 (re-exported)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "gpt2")
LAYER_TYPES = ("full", "sliding")

# Fields that say how to run a model rather than what the model is: an experiment config may
# change them for a converted checkpoint (see `ModelConfig.with_runtime`).
RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "attention", "kernels", "scan_layers")


@dataclasses.dataclass(frozen=True)
class ModelConfig(FamilyConfig):
    family: str = "llama"
    vocab_size: int = 8000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 64
    d_ff: int = 768
    max_positions: int = 2048

    # Normalization: "rms" (Llama family) or "layer" (GPT-2, with bias).
    norm: str = "rms"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    norm_scale_plus_one: bool = False  # Gemma: y = norm(x) * (1 + w), w initialised at 0

    # Feed-forward: gated = act(x W_gate) * (x W_up) (SwiGLU / GeGLU), else act(x W_up).
    gated_mlp: bool = True
    activation: str = "silu"  # silu | gelu_tanh | gelu (exact erf)

    # Positions: "rope" (rotate-half convention of HF checkpoints) or "learned" (GPT-2).
    position: str = "rope"
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"  # none | llama3 | linear
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_positions: int = 8192  # llama3 only

    qkv_bias: bool = False  # Qwen2, GPT-2
    out_bias: bool = False  # GPT-2 (attention output projection)
    mlp_bias: bool = False  # GPT-2
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(d_model)
    tie_embeddings: bool = False  # output head = embedding matrix transposed
    sliding_window: int = 0  # Mistral-style local attention over the last N tokens; 0 = off
    # Per-layer attention (Gemma 2/3, Qwen3 with sliding layers): one entry per layer, "sliding"
    # (attend to the last `sliding_window` tokens) or "full"; () = every layer alike (all sliding
    # when sliding_window > 0, as Mistral).
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float = 0.0  # Gemma 3: the rope base of sliding layers (no scaling there); 0 = rope_theta
    qk_norm: str = "none"  # none | head (Qwen3, Gemma 3: RMSNorm of each head's q, k) | full (OLMo 2: over all heads)
    block_norms: str = "pre"  # pre (Llama) | sandwich (Gemma 2/3: also after attention and MLP) | post (OLMo 2: only after)
    attn_softcap: float = 0.0  # Gemma 2: attention scores -> cap * tanh(scores / cap); 0 = off
    final_softcap: float = 0.0  # Gemma 2: logits -> cap * tanh(logits / cap); 0 = off
    query_scale: float = 0.0  # scores scaled by query_scale ** -0.5 (Gemma's query_pre_attn_scalar); 0 = head_dim
    init_std: float = 0.02

    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; logits are always float32
    remat: str = "none"  # none | full | dots
    attention: str = "xla"  # xla | cudnn (jax.nn.dot_product_attention) | reference
    kernels: str = "auto"  # auto | cpu | xla: hand-tuned CPU kernels or plain XLA (flan_jax/model/kernels)
    # Layers stacked and run by one lax.scan (True) or a Python loop (False); None: by depth
    # (`scanned`). Changes the parameter layout (model/layout.py), not the model.
    scan_layers: bool | None = None

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = RUNTIME_FIELDS

    def __post_init__(self) -> None:
        self.check_choices(
            family=FAMILIES, norm=("rms", "layer"), activation=("silu", "gelu_tanh", "gelu"),
            position=("rope", "learned"), rope_scaling=("none", "llama3", "linear"),
            qk_norm=("none", "head", "full"), block_norms=("pre", "sandwich", "post"),
        )
        self.check_runtime_choices()
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig: RoPE needs an even head_dim, got {self.head_dim}")
        if not isinstance(self.layer_types, tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))  # lists from JSON / configs
        if self.layer_types:
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad or len(self.layer_types) != self.n_layers:
                raise ValueError(f"ModelConfig.layer_types: {len(self.layer_types)} entries for {self.n_layers} layers, "
                                 f"each one of {LAYER_TYPES} (unknown: {bad})")
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ValueError("ModelConfig.layer_types has sliding layers but sliding_window is 0")
        for name in ("attn_softcap", "final_softcap", "query_scale", "local_rope_theta"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be >= 0 (0: off)")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> ModelConfig:
        """The architecture switches of `family`, then `overrides` (sizes, dtypes, ...)."""
        if family not in _FAMILY_DEFAULTS:
            raise ValueError(f"Unknown model family {family!r}; expected one of {FAMILIES}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"ModelConfig has no field(s) {unknown}")
        return cls(**{"family": family, **_FAMILY_DEFAULTS[family], **overrides})

    @classmethod
    def from_config(cls, model_section: Any) -> ModelConfig:
        """From the `config.model` section of an experiment config (an ml_collections ConfigDict).

        Every field of the section that ModelConfig knows is used, except that a field left at
        None (an ml_collections placeholder, e.g. `tie_embeddings`) keeps the family default.
        Fields of other families (T5's) must stay at their defaults (model.registry.family_fields).
        """
        from flan_jax.model import registry  # local import: registry imports this module

        values = registry.family_fields(model_section, cls)
        family = values.pop("family", None) or "llama"
        overrides = {k: v for k, v in values.items() if v is not None}
        return cls.for_family(family, **overrides)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """From a Hugging Face `config.json` dict (transformers 4.x or 5.x layout)."""
        from flan_jax.model import hf_config  # local import: keeps this module dependency-free

        return hf_config.from_hf(cls, hf, **overrides)

    # ------------------------------------------------------------------ what the trainer asks
    def check_data(self, data_config: Any) -> None:
        """Data settings this model cannot train on, refused before any work."""
        if self.position == "learned" and int(data_config.seq_len) > self.max_positions:
            # A learned position table (GPT-2) has no row past max_positions: the lookup would give NaNs.
            raise ValueError(
                f"config.data.seq_len={data_config.seq_len} exceeds the model's learned position table "
                f"(config.model.max_positions={self.max_positions}); shorten the rows or enlarge the table"
            )
        if int(data_config.get("targets_len", 0) or 0):
            raise ValueError(
                f"config.data.targets_len={data_config.targets_len} is the decoder length of an encoder-decoder "
                f"(T5); a {self.family} model trains on rows of config.data.seq_len: leave targets_len at 0"
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included)."""
        d, h, kv, hd, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        norm = d * (2 if self.norm_bias else 1)
        attn = d * hd * (h + 2 * kv) + h * hd * d
        attn += (h + 2 * kv) * hd * self.qkv_bias + d * self.out_bias
        attn += {"none": 0, "head": 2 * hd, "full": (h + kv) * hd}[self.qk_norm]
        mlp = d * f * (3 if self.gated_mlp else 2) + (f + d) * self.mlp_bias
        block_norms = {"pre": 2, "sandwich": 4, "post": 2}[self.block_norms] * norm
        total = self.n_layers * (attn + mlp + block_norms) + norm + self.vocab_size * d
        total += 0 if self.tie_embeddings else d * self.vocab_size
        total += self.max_positions * d if self.position == "learned" else 0
        return total

    @property
    def embed_multiplier(self) -> float:
        return math.sqrt(self.d_model) if self.embed_scale else 1.0


_LLAMA = dict(
    norm="rms", norm_eps=1e-5, gated_mlp=True, activation="silu", position="rope",
    qkv_bias=False, out_bias=False, mlp_bias=False, embed_scale=False, tie_embeddings=False,
)
_GEMMA = {
    **_LLAMA, "norm_eps": 1e-6, "norm_scale_plus_one": True, "activation": "gelu_tanh",
    "embed_scale": True, "tie_embeddings": True,
}
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": {**_LLAMA, "norm_eps": 1e-6, "qkv_bias": True, "rope_theta": 1_000_000.0},
    "qwen3": {**_LLAMA, "norm_eps": 1e-6, "rope_theta": 1_000_000.0, "qk_norm": "head"},
    "gemma": _GEMMA,
    "gemma2": {**_GEMMA, "block_norms": "sandwich", "attn_softcap": 50.0, "final_softcap": 30.0},
    "gemma3": {**_GEMMA, "block_norms": "sandwich", "qk_norm": "head", "rope_theta": 1_000_000.0,
               "local_rope_theta": 10_000.0},
    "phi3": _LLAMA,
    "olmo2": {**_LLAMA, "norm_eps": 1e-6, "rope_theta": 500_000.0, "block_norms": "post", "qk_norm": "full"},
    "gpt2": dict(
        norm="layer", norm_eps=1e-5, norm_bias=True, gated_mlp=False, activation="gelu_tanh",
        position="learned", qkv_bias=True, out_bias=True, mlp_bias=True, embed_scale=False,
        tie_embeddings=True,
    ),
}
