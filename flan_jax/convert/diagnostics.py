"""Error messages for conversions that name the file, the tensor and the config fields at fault.

A tensor whose shape disagrees with the config is the commonest bad input (a wrong `config.json`,
a checkpoint of another size, a truncated edit). numpy's own message (`cannot reshape array of
size 15360 into shape (150,96)`) names none of the three, so converters ask `shape_mismatch`
instead: it says which source tensor, in which file, has which shape, and which config fields
imply the shape that was expected, e.g.

    model.safetensors: tensor 'model.layers.0.self_attn.q_proj.weight' has shape (150, 96), but
    config.json implies (160, 96) (hidden_size=96, num_attention_heads=5, head_dim=32)

The expected source shape is computed by running the rule's export direction on zero-stride
placeholders, so it is always what the converter would write, never a second copy of the layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from flan_jax.convert import mapping
from flan_jax.model.config import ModelConfig  # or a T5Config: the fields named below are alike

# Our logical axis names -> the config field that sets each size, per config layout.
_LLAMA_FIELDS = {
    "vocab": "vocab_size", "embed": "hidden_size", "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "mlp": "intermediate_size",
    "positions": "max_position_embeddings",
}
_GPT2_FIELDS = {
    "vocab": "vocab_size", "embed": "n_embd", "heads": "n_head", "kv_heads": "n_head",
    "head_dim": "n_embd / n_head", "mlp": "n_inner", "positions": "n_positions",
}
_T5_FIELDS = {"vocab": "vocab_size", "embed": "d_model", "heads": "num_heads", "head_dim": "d_kv", "mlp": "d_ff"}
_SIZES = {
    "vocab": "vocab_size", "embed": "d_model", "heads": "n_heads", "kv_heads": "n_kv_heads",
    "head_dim": "head_dim", "mlp": "d_ff", "positions": "max_positions",
}


def config_fields(cfg: ModelConfig, axes: Sequence[Sequence[str]], field_names: Mapping[str, str] | None = None) -> str:
    """'hidden_size=96, num_attention_heads=5, head_dim=32' for the logical axes of some parameters."""
    names = field_names or {"gpt2": _GPT2_FIELDS, "t5": _T5_FIELDS}.get(cfg.family, _LLAMA_FIELDS)
    used = {a for param_axes in axes for a in param_axes}
    return ", ".join(f"{names[a]}={getattr(cfg, _SIZES[a])}" for a in _SIZES if a in used and a in names)


def expected_source_shapes(rule: mapping.Rule, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The source tensors' shapes `rule` expects, given our parameters' shapes."""
    placeholders = [np.broadcast_to(np.zeros((), np.bool_), shape) for shape in shapes]
    return [tuple(array.shape) for array in rule.to_hf(placeholders)]


def shape_mismatch(
    *,
    where: str,
    key: str,
    got: tuple[int, ...],
    rule: mapping.Rule,
    cfg: ModelConfig,
    expected: Mapping[tuple, tuple[int, ...]],
    axes: Mapping[tuple, tuple[str, ...]],
    config_name: str = "config.json",
    field_names: Mapping[str, str] | None = None,
) -> ValueError:
    """The error for a source tensor whose shape the config does not imply (see the module doc)."""
    want = dict(zip(rule.hf_keys, expected_source_shapes(rule, [expected[p] for p in rule.paths])))
    fields = config_fields(cfg, [axes[p] for p in rule.paths], field_names)
    return ValueError(
        f"{where}: tensor {key!r} has shape {tuple(got)}, but {config_name} implies "
        f"{want[key]} ({fields}); is {config_name} the one that belongs to these weights?"
    )
