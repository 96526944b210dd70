"""Training objectives, selected by `config.objective.name` (default "sft").

    from flan_jax.train import objectives

    @objectives.register_objective("my_loss")
    class MyLoss(objectives.Objective):
        features = ("input_tokens", ...)
        def prepare(self, batch): ...
        def loss_sum(self, ctx, batch): ...

base.py says what an objective computes and why in two stages; sft.py is the reference example.
Built in: "sft"; "reward_model" (reward.py); "dpo", "ipo", "simpo" (dpo.py), on preference pairs
(pairwise.py); "grpo", "ppo" (flan_jax/rl: an objective with `loop = "rl"` is trained by the RL
loop, which samples its batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flan_jax.train.objectives.base import Objective, ObjectiveContext, Prepared

_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator registering an Objective subclass under `name`."""

    def register(cls: type[Objective]) -> type[Objective]:
        if name in _OBJECTIVES and _OBJECTIVES[name] is not cls:
            raise ValueError(f"Objective {name!r} is already registered ({_OBJECTIVES[name].__qualname__})")
        cls.name = name
        _OBJECTIVES[name] = cls
        return cls

    return register


def objective_names() -> list[str]:
    _import_builtin()
    return sorted(_OBJECTIVES)


def get_objective(config: Any) -> Objective:
    """The objective `config.objective.name` names, built from the experiment config."""
    _import_builtin()
    name = config.objective.name
    if name not in _OBJECTIVES:
        raise ValueError(f"config.objective.name={name!r}: expected one of {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[name](config)


def _import_builtin() -> None:
    from flan_jax.rl import grpo, ppo  # noqa: F401  (online RL: trained by flan_jax.rl.loop)
    from flan_jax.train.objectives import dpo, reward, sft  # noqa: F401  (register themselves)


__all__ = ["Objective", "ObjectiveContext", "Prepared", "get_objective", "objective_names", "register_objective"]
