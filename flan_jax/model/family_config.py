"""What every model family's config dataclass has in common (ModelConfig, T5Config).

A mixin, so each family keeps its own frozen dataclass (hashable: NNX keeps it in the static
graph jit hashes) and its own constructors, and shares the plumbing the trainer, the converter and
`checkpoint.init_from` use on any family's config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar


class FamilyConfig:
    # Fields that say how to run a model rather than what the model is: an experiment config may
    # change them for a converted checkpoint (`with_runtime`).
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ()

    def check_choices(self, **fields: tuple[Any, ...]) -> None:
        """Each named field must hold one of its allowed values (a typo fails here, by name)."""
        for name, allowed in fields.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{type(self).__name__}.{name}={value!r}; expected one of {allowed}")

    def check_runtime_choices(self) -> None:
        """The runtime fields every family has: dtypes, rematerialisation, attention, kernels."""
        dtypes = ("float32", "bfloat16", "float16")
        self.check_choices(
            remat=("none", "full", "dots"), attention=("xla", "cudnn", "reference"), kernels=("auto", "cpu", "xla"),
            param_dtype=dtypes, dtype=dtypes,
        )

    @property
    def scanned(self) -> bool:
        """Whether the layers are stacked and run by one `lax.scan` (model/layout.py). A family
        without `scan_layers` (T5 today) always runs them unrolled."""
        return False

    def unrolled(self) -> Any:
        """This config with its layers unrolled (how converted checkpoints and HF/PEFT folders hold them)."""
        return self

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    def with_runtime(self, model_section: Any) -> Any:
        """This architecture run as `config.model` asks (its RUNTIME_FIELDS: dtypes, remat, ...).

        Used with `checkpoint.init_from`: the architecture comes from the converted checkpoint,
        how to run it from the experiment config.
        """
        get = model_section.get if hasattr(model_section, "get") else model_section.__getitem__
        return self.replace(**{name: get(name) for name in self.RUNTIME_FIELDS if get(name) is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """Exactly the config `to_dict()` saved (e.g. a converted checkpoint's model_config.json)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}")
        return cls(**values)
