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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one kind of model.

    name               the architecture's registry key (e.g. "decoder"); `config.model.family`
                       values map to it through `aliases` (llama, mistral, ... are all "decoder")
    config_from        `config.model` section -> the family's frozen config dataclass
    build              (model config, rngs, heads) -> nnx.Module
    feature_converter  the batch layout the family trains on ("decoder": design.md §4)
    aliases            the `config.model.family` names that select this family
    """

    name: str
    config_from: Callable[[Any], Any]
    build: Callable[..., nnx.Module]
    feature_converter: str
    aliases: tuple[str, ...] = ()


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


def _register_builtin() -> None:
    """The decoder family (Llama, Mistral, Qwen2, Gemma, GPT-2 are its switches), once."""
    if "decoder" in _FAMILIES:
        return
    from flan_jax.model import config as config_lib, transformer

    register_family(
        Family(
            name="decoder",
            config_from=config_lib.ModelConfig.from_config,
            build=lambda cfg, *, rngs, heads=(): transformer.Transformer(cfg, rngs=rngs, heads=heads),
            feature_converter="decoder",
            aliases=config_lib.FAMILIES,
        )
    )
