"""Model families: which module a `config.model.family` builds, registered by name.

The trainer, checkpoint loading, conversion and evaluation never construct a model class
themselves; they ask this registry. A family owns its config type (`from_config` reads the
experiment's `config.model` section) and its builder, and names the feature converter that lays
out its batches (`"decoder"`: docs/design.md §4), so a new architecture is a new module that
registers itself, not a branch through the trainer.

    family = registry.get_family(config.model.family)
    model_cfg = family.config_from(config.model)
    model = registry.build_model(model_cfg, rngs=nnx.Rngs(0), heads=("score",))

`heads` asks for extra output heads beside the language-model head, e.g. the scalar `score` head
of a reward model (issue: preference tuning) or a PPO value head; a family that cannot carry a
head refuses it by name.

Built in: "decoder" (model/transformer.py; config.model.family llama | mistral | qwen2 | gemma |
gpt2) and "t5" (model/t5.py, the encoder-decoder; config.model.family t5 | t5_original).

What a family's config object provides (ModelConfig and T5Config do): `family`, `to_dict()`,
`replace(**changes)`, `with_runtime(config.model)`, `RUNTIME_FIELDS` (fields a run may change on
converted weights), `num_params` and `check_data(config.data)` (settings it cannot train on, refused
before any work), optionally `flops_per_token(n_matmul, config.data)` for the MFU estimate (else
train/metrics.py's decoder formula); model/family_config.py has the shared part. Its model's
`hidden_states(**features)` / `__call__(**features)` take the model features its converter
(flan_jax.data.converters) lays out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one kind of model.

    name                  the architecture's registry key (e.g. "decoder"); `config.model.family`
                          values map to it through `aliases` (llama, mistral, ... are all "decoder")
    config_from           `config.model` section -> the family's frozen config dataclass
    build                 (model config, rngs, heads) -> nnx.Module
    feature_converter     the batch layout the family trains and is scored on
                          (flan_jax.data.converters: "decoder" = design.md §4, "encdec" = T5's)
    aliases               the `config.model.family` names that select this family
    config_from_dict      a saved `to_dict()` (model_config.json) -> the config, exactly
    generate              the family's decoding loop, (model, generate.DecodeRequest) -> (tokens,
                          logits | None, steps run); `generate.generate` (the evaluator's) calls it
    hf                    Hugging Face import/export (`HFInterop`), None if the family has none
    tokenizer_convention  special ids of a tokenizer trained for it: "decoder" (pad 0, unk 1,
                          BOS 2, EOS 3) or "t5" (pad 0, EOS 1, unk 2, no BOS, 100 sentinels)
    """

    name: str
    config_from: Callable[[Any], Any]
    build: Callable[..., nnx.Module]
    feature_converter: str
    aliases: tuple[str, ...] = ()
    config_from_dict: Callable[[Mapping[str, Any]], Any] | None = None
    generate: Callable[..., Any] | None = None
    hf: HFInterop | None = None
    tokenizer_convention: str = "decoder"


@dataclasses.dataclass(frozen=True)
class HFInterop:
    """How a family reads and writes Hugging Face folders (flan_jax.convert uses only this).

    model_types        config.json `model_type` values it reads
    config_from_hf     (config.json dict, safetensors tensor names) -> model config; refuses
                       anything it cannot reproduce, by name, before anything is written
    config_to_hf       (model config, dtype=, token_ids=) -> config.json dict
    tensor_rules       model config -> the convert.mapping.Rule list (HF tensors <-> params)
    skip_tensor        (model config, HF tensor name) -> True for stored tensors with no
                       parameter (buffers, tied duplicates): logged on import, never an error
    canonical_key      (model config, HF tensor name) -> the name the rules use
    """

    model_types: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any], Collection[str]], Any]
    config_to_hf: Callable[..., dict]
    tensor_rules: Callable[[Any], list]
    skip_tensor: Callable[[Any, str], bool]
    canonical_key: Callable[[Any, str], str] = lambda cfg, key: key


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Adds `family` under its name and aliases; a name taken by another family is an error."""
    for key in (family.name, *family.aliases):
        existing = _FAMILIES.get(key)
        if existing is not None and existing is not family:
            raise ValueError(f"Model family name {key!r} is already registered (by family {existing.name!r})")
    for key in (family.name, *family.aliases):
        _FAMILIES[key] = family
    return family


def get_family(name: str) -> Family:
    _register_builtin()
    if name not in _FAMILIES:
        raise ValueError(f"Unknown model family {name!r} (config.model.family); registered: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def family_names() -> list[str]:
    _register_builtin()
    return sorted(_FAMILIES)


def config_from(model_section: Any) -> Any:
    """The model config of `config.model` (its `family` field picks the family)."""
    get = model_section.get if hasattr(model_section, "get") else model_section.__getitem__
    return get_family(get("family") or "llama").config_from(model_section)


def config_from_dict(values: Mapping[str, Any]) -> Any:
    """A model config saved with `to_dict()` (e.g. a converted checkpoint's model_config.json)."""
    family = get_family(values.get("family") or "llama")
    return (family.config_from_dict or family.config_from)(values)


def build_model(model_cfg: Any, *, rngs: nnx.Rngs, heads: Sequence[str] = (), lora: Any = None) -> nnx.Module:
    """The module of `model_cfg`'s family, with the extra output `heads` asked for.

    `lora` (a `flan_jax.model.lora.LoRAConfig`) adds LoRA adapters to the projections it targets,
    after every other parameter is created (so the base initialisation does not change).
    """
    model = get_family(model_cfg.family).build(model_cfg, rngs=rngs, heads=tuple(heads))
    if lora is not None:
        from flan_jax.model import lora as lora_lib

        lora_lib.apply(model, lora, rngs=rngs)
    return model


def family_of(model: Any) -> Family:
    """The family of a built model (by its `cfg`). A module without one (a test stand-in taking
    the decoder's features) counts as a decoder."""
    cfg = getattr(model, "cfg", None)
    return get_family(getattr(cfg, "family", None) or "llama")


def hf_family(model_type: str | None) -> Family:
    """The family that reads Hugging Face `model_type`; the error lists every supported type."""
    _register_builtin()
    families = list(dict.fromkeys(_FAMILIES.values()))
    for family in families:
        if family.hf is not None and model_type in family.hf.model_types:
            return family
    supported = sorted(t for f in families if f.hf is not None for t in f.hf.model_types)
    from flan_jax.model.hf_config import UnsupportedConfigError

    raise UnsupportedConfigError(f"config.json model_type={model_type!r} is not supported; supported: {supported}")


def family_fields(model_section: Any, config_cls: type) -> dict[str, Any]:
    """The `config.model` values that `config_cls` (a family's config dataclass) has.

    The experiment config's model section holds the fields of every family. A field of another
    family is accepted only at its default (or None), so a setting the chosen family would ignore
    is an error naming it rather than silently without effect.
    """
    from flan_jax import default_config

    values = dict(model_section.to_dict() if hasattr(model_section, "to_dict") else model_section)
    own = {f.name for f in dataclasses.fields(config_cls)}
    defaults = default_config.get_config().model.to_dict()
    foreign = sorted(k for k, v in values.items() if k not in own and v is not None and (k not in defaults or v != defaults[k]))
    if foreign:
        family = values.get("family")
        raise ValueError(
            f"config.model sets {foreign}, which model family {family!r} ({config_cls.__name__}) does not have; "
            "leave them at their defaults (see flan_jax/default_config.py)"
        )
    return {k: v for k, v in values.items() if k in own}


def _register_builtin() -> None:
    """The decoder family (Llama, Mistral, Qwen2, Gemma, GPT-2 are its switches) and T5, once."""
    if "decoder" in _FAMILIES:
        return
    from flan_jax.convert import mapping, t5_mapping
    from flan_jax.model import config as config_lib, generate, hf_config, t5, t5_config, t5_generate, transformer

    register_family(
        Family(
            name="decoder",
            config_from=config_lib.ModelConfig.from_config,
            build=lambda cfg, *, rngs, heads=(): transformer.Transformer(cfg, rngs=rngs, heads=heads),
            feature_converter="decoder",
            aliases=config_lib.FAMILIES,
            config_from_dict=config_lib.ModelConfig.from_dict,
            generate=generate.decode,
            hf=HFInterop(
                model_types=hf_config.MODEL_TYPES,
                config_from_hf=lambda hf, tensor_names: config_lib.ModelConfig.from_hf_config(hf),
                config_to_hf=hf_config.to_hf,
                tensor_rules=mapping.rules,
                skip_tensor=mapping.skip_tensor,
                canonical_key=mapping.canonical_key,
            ),
        )
    )
    register_family(
        Family(
            name="t5",
            config_from=t5_config.T5Config.from_config,
            build=lambda cfg, *, rngs, heads=(): t5.T5(cfg, rngs=rngs, heads=heads),
            feature_converter="encdec",
            aliases=tuple(t5_config.FAMILIES),
            config_from_dict=t5_config.T5Config.from_dict,
            generate=t5_generate.decode,
            hf=HFInterop(
                model_types=t5_config.HF_MODEL_TYPES,
                config_from_hf=t5_config.T5Config.from_hf_config,
                config_to_hf=t5_config.to_hf,
                tensor_rules=t5_mapping.rules,
                skip_tensor=t5_mapping.skip_tensor,
            ),
            tokenizer_convention="t5",
        )
    )
