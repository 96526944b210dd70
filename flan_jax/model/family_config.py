"""What every model family's config dataclass has in common (ModelConfig, T5Config).

A mixin, so each family keeps its own frozen dataclass (hashable: NNX keeps it in the static
graph jit hashes) and its own constructors, and shares the plumbing the trainer, the converter and
`checkpoint.init_from` use on any family's config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

# `scan_layers=None` scans models with at least this many layers (see `default_scan_layers`).
SCAN_MIN_LAYERS = 8


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
        """The runtime fields every family has: dtypes, rematerialisation, attention, kernels, layer layout."""
        dtypes = ("float32", "bfloat16", "float16")
        self.check_choices(
            remat=("none", "full", "dots"), attention=("xla", "cudnn", "reference"), kernels=("auto", "cpu", "xla"),
            param_dtype=dtypes, dtype=dtypes, scan_layers=(None, True, False),
        )

    @property
    def scanned(self) -> bool:
        """Whether the layers are stacked and run by one `lax.scan` (model/layer_stack.py, the
        parameter layout in model/layout.py): `scan_layers`, or when None, `default_scan_layers`
        for the backend jax runs on."""
        return self.scan_layers if self.scan_layers is not None else default_scan_layers(self)

    def unrolled(self) -> Any:
        """This config with its layers unrolled (how converted checkpoints and HF/PEFT folders hold them)."""
        return self.replace(scan_layers=False)

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


def default_scan_layers(cfg: FamilyConfig, backend: str | None = None) -> bool:
    """What `scan_layers=None` means, from measurements (docs/training.md, "Scanned or unrolled").

    Scanned from SCAN_MIN_LAYERS layers on (`cfg.n_layers`: the decoder's depth, T5's encoder
    depth): compile time then no longer grows with depth (a Llama-3-8B step 55 s instead of 560 s
    on a CPU host), and on CPU in float32 an 8- or 16-layer step also ran 10-14% faster scanned,
    while a 4-layer one ran 12-25% slower.
    Except on CPU with bf16 / f16 compute and no remat, where XLA:CPU turns the stacked bf16
    activations saved for the backward pass into float32 and the backward matmuls leave its fast
    bf16 path (the step ran at half speed scanned, at 4 and 16 layers alike). `backend` defaults
    to `jax.default_backend()`; "cpu" is the only one treated differently. On GPUs the step-time
    side is not yet measured (benchmarks/gpu_check.sh, stage scan_1b); set `scan_layers=False`
    to compare there. (Measured on the decoder; T5 follows the same rule.)
    """
    if cfg.n_layers < SCAN_MIN_LAYERS:
        return False
    if backend is None:
        import jax  # local import: the rest of this module stays dependency-free

        backend = jax.default_backend()
    return not (backend == "cpu" and cfg.dtype != "float32" and cfg.remat == "none")
