"""LoRA and the trainable filter in scanned (stacked) layers: the same adapters, selections,
exports and imports as with unrolled layers, from one converted base.

The base is stored per layer (converted checkpoints always are); each run builds it in its own
layout. Adapters are drawn from the seed per layout (a stack draws one array), so the comparisons
below move ONE set of adapters between the layouts with `layout.stack`.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals
from safetensors.numpy import load_file

from flan_jax import convert, model as fm
from flan_jax.convert import hf_export, peft
from flan_jax.model import layout, lora
from flan_jax.train import loop, partitioning
from tests import train_fakes

LAYERS = {"model.n_layers": 3}
LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": ("q", r"layers/\d+/mlp/down$")}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan_lora") / "base"
    config = train_fakes.demo_config({**train_fakes.demo_overrides(""), **LAYERS})
    cfg = fm.ModelConfig.from_config(config.model)
    params = nnx.to_pure_dict(nnx.state(fm.Transformer(cfg.replace(init_std=0.1), rngs=nnx.Rngs(7)), nnx.Param))
    convert.save_converted(path, cfg, params)
    return path


def _config(base, scan: bool, **extra):
    values = train_fakes.demo_overrides("", checkpoint__init_from=str(base), model__scan_layers=scan)
    values.update({**LAYERS, **LORA})
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return train_fakes.demo_config(values)


def _run(config):
    """(parts, step-0 params, mesh, model cfg) of a run's config, as the trainer builds them."""
    mesh = partitioning.make_mesh(config.mesh)
    cfg, parts = loop.build_model(config, mesh, partitioning.axis_rules(config.mesh))
    return parts, loop.initial_params(config, parts, mesh, cfg), cfg


def _logits(model, ids) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))


def _flat_np(tree) -> dict:
    return {k: np.asarray(v) for k, v in traversals.flatten_mapping(tree).items()}


def test_lora_in_scanned_layers_trains_exports_and_imports_like_unrolled(base, tmp_path):
    ids = np.random.default_rng(0).integers(1, 400, (2, 12)).astype(np.int32)
    base_cfg, plain = convert.load_converted(base, stacked=False)
    base_model = fm.Transformer(base_cfg, rngs=nnx.Rngs(0))
    nnx.update(base_model, plain)
    expected = _logits(base_model, ids)

    runs = {scan: _run(_config(base, scan)) for scan in (False, True)}
    (u_parts, u_params, u_cfg), (s_parts, s_params, s_cfg) = runs[False], runs[True]
    assert not u_cfg.scanned and s_cfg.scanned
    n = s_cfg.n_layers
    assert s_params["layers"]["attn"]["q"]["lora_a"].shape[0] == n and "lora_a" not in s_params["layers"]["attn"]["k"]
    assert s_params["layers"]["mlp"]["down"]["lora_b"].shape[0] == n

    # Step 0 is the base in both layouts (B = 0), the base read per layer from the converted folder.
    for parts, params in ((u_parts, u_params), (s_parts, s_params)):
        np.testing.assert_allclose(_logits(parts.merge(params), ids), expected, rtol=1e-5, atol=1e-5)

    # The trainable filter selects the same parameters: the scanned run's paths are the stacks of
    # the unrolled run's.
    unrolled_trained = {(p[0], *p[2:]) if p[0] == "layers" else p for p in u_parts.selection.trained}
    assert set(s_parts.selection.trained) == unrolled_trained and any(p[-1] == "lora_b" for p in unrolled_trained)

    # One set of (nonzero) adapters in both layouts computes the same logits ...
    rng = np.random.default_rng(1)
    flat = _flat_np(u_params)
    for path in flat:
        if path[-1] == "lora_b":
            flat[path] = rng.normal(0.0, 0.5, flat[path].shape).astype(flat[path].dtype)
    unrolled_params = traversals.unflatten_mapping(flat)
    scanned_params = layout.stack(unrolled_params)
    unrolled_model, scanned_model = u_parts.merge(unrolled_params), s_parts.merge(scanned_params)
    ours = _logits(scanned_model, ids)
    np.testing.assert_allclose(ours, _logits(unrolled_model, ids), rtol=1e-5, atol=1e-5)
    assert np.abs(ours - expected).max() > 1e-3  # the adapters do change the model

    # ... exports the same PEFT folder (per-layer HF modules) and the same merged model ...
    lora_cfg = lora.LoRAConfig.from_config(_config(base, True).lora)
    for name, (model, cfg) in {"unrolled": (unrolled_model, u_cfg), "scanned": (scanned_model, s_cfg)}.items():
        peft.write_peft(tmp_path / name, cfg, model, lora_cfg)
    a, b = (load_file(tmp_path / name / peft.ADAPTER_WEIGHTS) for name in ("unrolled", "scanned"))
    assert set(a) == set(b) and n == 3 and len(a) == 2 * 2 * n and "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in a
    assert all(np.array_equal(a[k], b[k]) for k in a)
    configs = [json.loads((tmp_path / name / peft.ADAPTER_CONFIG).read_text()) for name in ("unrolled", "scanned")]
    assert configs[0] == configs[1] and sorted(configs[0]["target_modules"]) == ["down_proj", "q_proj"]
    merged_u = _flat_np(hf_export.plain_params(unrolled_model, u_cfg))
    merged_s = _flat_np(layout.unstack(hf_export.plain_params(scanned_model, s_cfg)))
    assert set(merged_u) == set(merged_s) and all(np.array_equal(merged_u[k], merged_s[k]) for k in merged_u)

    # ... and a scanned run started from that PEFT folder holds exactly those adapters, stacked.
    _, from_peft, _ = _run(_config(base, True, lora__init_from=str(tmp_path / "scanned")))
    got, want = _flat_np(from_peft), _flat_np(scanned_params)
    adapters = [p for p in want if lora.is_adapter_path(p)]
    assert adapters and all(np.array_equal(got[p], want[p]) for p in adapters)


@pytest.mark.parametrize("override, field", [
    ({"lora.targets": (r"layers/0/attn/q$",)}, "config.lora.targets"),
    ({"trainable.paths": (r"layers/1/",)}, "config.trainable.paths"),
])
def test_a_selection_of_some_layers_of_a_stack_is_refused_by_name(base, override, field):
    """Selecting layers 0 or 1 alone works unrolled, but a stack is one array: a clear error."""
    for key, value in override.items():
        _run(_config(base, False, **{key.replace(".", "__"): value}))  # fine unrolled
    config = _config(base, True, **{k.replace(".", "__"): v for k, v in override.items()})
    with pytest.raises(layout.PartialStackError, match=rf"{field}=.*selects layers \[\d\] of the \d+ in layers/") as error:
        _run(config)
    assert "config.model.scan_layers=False" in str(error.value)
