"""Scanned T5 stacks (`scan_layers`): the same model as unrolled layers, trained, generated,
converted, adapted and checkpointed the same, with each layout's parameters the other's stacked.

Every comparison moves ONE set of weights between the layouts with `layout.to_layout` (the tiny
random transformers models of tests/t5_fakes.py: a 2-layer encoder and a 3-layer decoder, so a
mix-up of the two stacks or of layers within one changes shapes or numbers).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

from flan_jax import convert  # noqa: E402
from flan_jax.convert import peft  # noqa: E402
from flan_jax.model import generate as generate_lib  # noqa: E402
from flan_jax.model import layout, lora, registry, t5  # noqa: E402
from flan_jax.train import loop, optimizer, partitioning, state as state_lib, step as step_lib  # noqa: E402
from tests import t5_fakes, train_fakes  # noqa: E402
from tests.test_peft import adapted_model  # noqa: E402
from tests.test_t5 import _hf_greedy  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)  # against transformers (torch's float32 matmuls round differently)
SAME = dict(atol=1e-5, rtol=1e-5)  # between our layouts (XLA fuses a loop body differently from unrolled code)


@pytest.fixture(scope="module")
def pairs():
    """{variant: (hf model, our unrolled cfg, our unrolled model)}: FLAN-T5's layout and the original T5's."""
    out = {}
    for name in ("flan_t5", "t5_original"):
        hf = t5_fakes.build_hf(name)
        cfg, ours = t5_fakes.ours_from_hf(hf, scan_layers=False)
        out[name] = (hf, cfg, ours)
    return out


def _pure(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _in_layout(params: dict, cfg, scan: bool, lora_cfg=None):
    """A T5 of `cfg` in the layout `scan` holding `params` (either layout), built abstractly."""
    model = nnx.eval_shape(lambda: registry.build_model(cfg.replace(scan_layers=scan), rngs=nnx.Rngs(0), lora=lora_cfg))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, layout.to_layout(params, stacked=scan))
    nnx.update(model, state)
    return model


def _ids(cfg, seed=1):
    return t5_fakes.random_ids((2, 9), seed, cfg.vocab_size), t5_fakes.random_ids((2, 5), seed + 1, cfg.vocab_size)


def _logits(model, enc, dec) -> np.ndarray:
    return t5_fakes.logits(model, encoder_input_tokens=enc, decoder_input_tokens=dec)


def _flat_np(tree) -> dict:
    return {k: np.asarray(v) for k, v in traversals.flatten_mapping(tree).items()}


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------- the model
def test_a_scanned_t5_holds_the_unrolled_weights_stacked_per_stack():
    cfg = registry.config_from({"family": "t5", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_decoder_layers": 3,
                                "n_heads": 4, "head_dim": 8, "d_ff": 48, "relative_buckets": 8,
                                "relative_max_distance": 16})
    unrolled = t5.T5(cfg.replace(scan_layers=False), rngs=nnx.Rngs(3))
    scanned = t5.T5(cfg.replace(scan_layers=True), rngs=nnx.Rngs(3))
    assert isinstance(unrolled.encoder.layers, nnx.List) and not isinstance(scanned.encoder.layers, nnx.List)
    stacked = _pure(scanned)
    assert stacked["encoder"]["layers"]["attn"]["q"]["kernel"].shape == (2, 32, 4, 8)
    assert stacked["decoder"]["layers"]["cross_attn"]["k"]["kernel"].shape == (3, 32, 4, 8)
    assert stacked["decoder"]["rel_bias"].shape == (8, 4)  # the stack's table, beside its layers
    assert_trees_equal(layout.stack(_pure(unrolled)), stacked)  # same seed, same numbers
    assert_trees_equal(layout.unstack(stacked), _pure(unrolled))

    # scan_layers=None resolves by the encoder's depth when the model is built, as for decoders.
    shallow = nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(0)))
    deep = nnx.eval_shape(lambda: t5.T5(cfg.replace(n_layers=8, n_decoder_layers=8), rngs=nnx.Rngs(0)))
    assert cfg.scan_layers is None and shallow.cfg.scan_layers is False and deep.cfg.scan_layers is True


@pytest.mark.parametrize("name", ["flan_t5", "t5_original"])
def test_scanned_logits_equal_transformers_and_the_unrolled_stacks_packed_and_with_dropout(pairs, name):
    hf, cfg, unrolled = pairs[name]
    scanned = _in_layout(_pure(unrolled), cfg, True)
    assert scanned.cfg.scanned
    enc, dec = _ids(cfg)
    np.testing.assert_allclose(_logits(scanned, enc, dec), t5_fakes.hf_logits(hf, enc, dec), **TOL)

    if name != "flan_t5":
        return  # the layouts' packing and dropout do not depend on the variant: checked once
    # Packed rows and dropout: each layer folds its own index into the key in either layout.
    batch = t5_fakes.random_packed_batch(0, rows=3, vocab=cfg.vocab_size)
    features = {k: v for k, v in batch.items() if k not in ("decoder_target_tokens", "decoder_loss_weights")}
    for rate, key in ((0.0, None), (0.2, jax.random.key(4))):
        models = [t5_fakes.with_config(m, m.cfg.replace(dropout_rate=rate)) for m in (unrolled, scanned)]
        a, b = (t5_fakes.logits(m, **features, dropout_rng=key) for m in models)
        np.testing.assert_allclose(b, a, **SAME)
    no_dropout = t5_fakes.logits(scanned, **features)
    assert np.abs(b - no_dropout).max() > 1e-2  # the key did drop something out


@pytest.mark.parametrize("name", ["flan_t5", "t5_original"])
def test_scanned_generation_gives_transformers_tokens_and_cached_logits_equal_the_full_pass(pairs, name):
    hf, cfg, unrolled = pairs[name]
    scanned = _in_layout(_pure(unrolled), cfg, True)
    cache = scanned.init_cache(2, 7)
    assert cache[0].shape == (cfg.n_decoder_layers, 2, cfg.n_heads, 7, cfg.head_dim)  # one stacked array per stack
    prompts = [list(t5_fakes.random_ids((n,), 30 + n)) + [1] for n in (4, 9, 6)]  # T5 prompts end with EOS
    assert generate_lib.generate(scanned, prompts, max_new_tokens=10, eos_id=1, pad_id=0) == _hf_greedy(hf, prompts, 10)

    gen = generate_lib.generate_arrays(scanned, prompts, max_new_tokens=6, eos_id=1, pad_id=0, return_logits=True)
    ref = generate_lib.generate_arrays(unrolled, prompts, max_new_tokens=6, eos_id=1, pad_id=0, return_logits=True)
    np.testing.assert_array_equal(gen.tokens, ref.tokens)
    np.testing.assert_allclose(gen.logits, ref.logits, **SAME)
    for row, prompt in enumerate(prompts):
        steps = max(int(gen.lengths[row]), 1)
        decoder_inputs = np.asarray([[0, *gen.tokens[row, : steps - 1]]])
        full = t5_fakes.logits(scanned, encoder_input_tokens=np.asarray([prompt]), decoder_input_tokens=decoder_inputs)
        np.testing.assert_allclose(gen.logits[row, :steps], full[0], **TOL)


def test_a_converted_t5_loads_stacked_and_a_missing_layer_is_named(pairs, tmp_path):
    hf, cfg, _ = pairs["flan_t5"]
    hf.save_pretrained(tmp_path / "hf")
    convert.convert_from_hf(tmp_path / "hf", tmp_path / "converted")
    stacked_cfg, params = convert.load_converted(tmp_path / "converted", stacked=True)
    assert stacked_cfg.scanned and layout.is_stacked(nnx.to_pure_dict(params)) is True
    pure = nnx.to_pure_dict(params)
    assert pure["encoder"]["layers"]["mlp"]["gate"]["kernel"].shape[0] == cfg.n_layers
    assert pure["decoder"]["layers"]["mlp"]["gate"]["kernel"].shape[0] == cfg.n_decoder_layers
    model = _in_layout(pure, stacked_cfg, True)
    enc, dec = _ids(cfg, seed=3)
    np.testing.assert_allclose(_logits(model, enc, dec), t5_fakes.hf_logits(hf, enc, dec), **TOL)

    flat = convert.checkpoint.flatten(layout.unstack(pure))
    del flat[("decoder", "layers", 1, "cross_attn", "v", "kernel")]
    with pytest.raises(ValueError, match=r"cannot stack decoder/layers/cross_attn/v/kernel: no layer\(s\) \[1\] of the 3"):
        layout.stack_flat(flat)


# ---------------------------------------------------------------------- LoRA
def test_lora_on_scanned_t5_computes_exports_and_imports_as_unrolled(pairs, tmp_path):
    hf, cfg, unrolled_base = pairs["flan_t5"]
    hf.save_pretrained(tmp_path / "hf")
    lora_cfg = lora.LoRAConfig(rank=3, alpha=6.0, targets=(lora.ALL_LINEAR,))
    base_flat = traversals.flatten_mapping(_pure(unrolled_base))
    unrolled = adapted_model(cfg, base_flat, lora_cfg)  # random A and B: a mix-up cannot hide behind B = 0
    scanned = _in_layout(_pure(unrolled), cfg, True, lora_cfg)
    adapters = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))["decoder"]["layers"]["cross_attn"]["o"]
    assert adapters["lora_a"].shape[0] == adapters["lora_b"].shape[0] == cfg.n_decoder_layers
    paths = lora.select_projections(lora.projection_paths(scanned), (lora.ALL_LINEAR,))
    assert len(paths) == 7 + 11 and "decoder/layers/cross_attn/q" in paths  # one stacked projection per name

    enc, dec = _ids(cfg, seed=5)
    ours = _logits(scanned, enc, dec)
    np.testing.assert_allclose(ours, _logits(unrolled, enc, dec), **SAME)
    assert not np.allclose(ours, _logits(unrolled_base, enc, dec), atol=1e-2)  # the adapters do change the model

    # The same PEFT folder from either layout (per-layer HF modules), loaded by peft with our logits.
    for layout_name, model in (("unrolled", unrolled), ("scanned", scanned)):
        peft.write_peft(tmp_path / layout_name, model.cfg, model, lora_cfg)
    a, b = (load_file(tmp_path / n / peft.ADAPTER_WEIGHTS) for n in ("unrolled", "scanned"))
    assert set(a) == set(b) and "base_model.model.decoder.block.2.layer.1.EncDecAttention.o.lora_B.weight" in a
    assert all(np.array_equal(a[k], b[k]) for k in a)
    configs = [json.loads((tmp_path / n / peft.ADAPTER_CONFIG).read_text()) for n in ("unrolled", "scanned")]
    assert configs[0] == configs[1]
    hf_base = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    loaded = peft_lib.PeftModel.from_pretrained(hf_base, tmp_path / "scanned").eval()
    np.testing.assert_allclose(t5_fakes.hf_logits(loaded, enc, dec), ours, **TOL)

    # The folder imports per layer (as peft.load_into reads it for a scanned run) and stacks back
    # to the scanned model's adapters, bitwise.
    expected = {p: v for p, v in _flat_np(_pure(scanned)).items() if lora.is_adapter_path(p)}
    per_layer = traversals.flatten_mapping(layout.unstack(traversals.unflatten_mapping(expected)))
    back = _flat_np(layout.stack(traversals.unflatten_mapping(
        peft.adapter_arrays(tmp_path / "scanned", scanned.cfg, lora_cfg, per_layer))))
    assert back.keys() == expected.keys()
    for p in expected:
        np.testing.assert_array_equal(back[p], expected[p], err_msg=str(p))

    # Merged into the base and exported to HF from the scanned model: the adapter-on-base logits.
    merged = lora.merged_params(_pure(scanned), lora.scales_of(scanned))
    assert layout.is_stacked(merged) is True
    convert.write_hf(tmp_path / "merged", scanned.cfg, merged)
    merged_hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(t5_fakes.hf_logits(merged_hf, enc, dec), ours, **TOL)


# ---------------------------------------------------------------------- training
def _trainer(scan: bool):
    """(config, mesh, rules, parts, tx, shardings, train_step) of a tiny T5 run on an fsdp x tensor
    mesh with remat per layer and dropout, in the layout `scan`."""
    config = train_fakes.tiny_config()
    config.model.family = "t5"
    config.model.update(vocab_size=64, d_model=32, n_layers=2, n_decoder_layers=3, n_heads=4, head_dim=8, d_ff=64,
                        relative_buckets=8, relative_max_distance=16, dropout_rate=0.1, remat="full", scan_layers=scan)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:4])
    rules = partitioning.axis_rules(config.mesh)
    _, parts = loop.build_model(config, mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, 10)
    shardings = state_lib.state_shardings(parts, tx, mesh)
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    return config, mesh, rules, parts, tx, shardings, train_step


@pytest.fixture(scope="module")
def trainers():
    """{scan: trainer}, shared so each layout's step compiles once for the tests below."""
    return {scan: _trainer(scan) for scan in (False, True)}


def _train(trainer, batches, state=None):
    """(state, losses) after a step per batch from `state` (the seed's initial state if None; donated)."""
    config, mesh, rules, parts, tx, shardings, train_step = trainer
    state = state_lib.init_state(parts, tx, shardings, 0, mesh) if state is None else state
    return train_fakes.run_steps(train_step, state, batches, mesh, rules)


def test_train_steps_update_both_layouts_equally(trainers):
    """AdamW, 2 steps on the same batch, sharded, with remat per layer and dropout."""
    batches = [t5_fakes.random_packed_batch(0)] * 2
    (state_u, loss_u), (state_s, loss_s) = (_train(trainers[scan], batches) for scan in (False, True))
    assert loss_u[1] < loss_u[0]
    np.testing.assert_allclose(loss_s, loss_u, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=2e-4, atol=2e-5),
                 state_s.params, layout.stack(jax.tree.map(np.asarray, state_u.params)))
    assert state_s.params["decoder"]["layers"]["attn"]["q"]["kernel"].shape[0] == 3


def test_a_scanned_t5_checkpoint_resumes_unrolled_and_trains_on_equally(trainers, tmp_path):
    """Resume (params + AdamW state) and `init_from` across layouts, then train on equally."""
    batches = [t5_fakes.random_packed_batch(s) for s in range(1, 3)]
    saver, other = trainers[True], trainers[False]
    config = saver[0]
    state, _ = _train(saver, batches[:1])
    _, mesh, _, parts, tx, shardings, _ = other
    restored = train_fakes.save_then_restore(tmp_path, state, config, state_lib.abstract_state(parts, tx, shardings, seed=0))
    expected = layout.unstack(jax.tree.map(np.asarray, {"params": state.params, "opt_state": state.opt_state}))
    assert_trees_equal(jax.tree.map(np.asarray, {"params": restored.params, "opt_state": restored.opt_state}), expected)
    q = ("decoder", "layers", 2, "attn", "q", "kernel")
    assert traversals.flatten_mapping(restored.params)[q].sharding == traversals.flatten_mapping(shardings.params)[q]

    # init_from a converted folder (stored per layer) of the scanned run's weights, into either layout.
    convert.save_converted(tmp_path / "converted", registry.config_from(config.model), state.params)
    for trainer, stacked in ((saver, True), (other, False)):
        placed = loop.load_init_params(str(tmp_path / "converted"), trainer[3], registry.config_from(trainer[0].model))
        assert_trees_equal(jax.tree.map(np.asarray, placed), layout.to_layout(expected["params"], stacked=stacked))

    continued, _ = _train(other, batches[1:], state=restored)
    reference, _ = _train(saver, batches[1:], state=state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=2e-6), continued.params,
                 layout.unstack(jax.tree.map(np.asarray, reference.params)))
