"""LoRA on T5 (issue 16's "LoRA must work for T5"): adapters on the self- and cross-attention q, k,
v, o and the feed-forward wi_0 / wi_1 / wo (the original T5's wi), step 0 computing exactly the
base model, and PEFT parity both ways against peft on T5ForConditionalGeneration.

Tiny random models built offline (tests/t5_fakes.py); exported adapters get random A and B so a
wrong transpose, scale or module name cannot hide behind B = 0.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")

from flan_jax import convert  # noqa: E402
from flan_jax.convert import peft  # noqa: E402
from flan_jax.model import lora, registry  # noqa: E402
from tests import t5_fakes  # noqa: E402
from tests.test_peft import adapted_model  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{variant: (HF folder, our T5Config, our base params flat)}: FLAN-T5's layout and the original's."""
    out = {}
    for name in ("flan_t5", "t5_original"):
        path = tmp_path_factory.mktemp(f"t5_base_{name}")
        t5_fakes.build_hf(name).save_pretrained(path)
        cfg, params = convert.load_hf_params(path)
        out[name] = (path, cfg, params)
    return out


def _ids(cfg, seed=1):
    return t5_fakes.random_ids((2, 9), seed, cfg.vocab_size), t5_fakes.random_ids((2, 5), seed + 1, cfg.vocab_size)


def _ours(model, enc, dec) -> np.ndarray:
    return t5_fakes.logits(model, encoder_input_tokens=enc, decoder_input_tokens=dec)


def _hf(path):
    return transformers.T5ForConditionalGeneration.from_pretrained(path).eval()


def _adapter_arrays(model) -> dict:
    return {p: v for p, v in traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
            if lora.is_adapter_path(p)}


def test_lora_targets_t5_projections_by_our_and_peft_names_and_step_0_is_the_base(bases):
    path, cfg, base_params = bases["flan_t5"]
    plain = nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0)))
    paths = lora.projection_paths(plain)
    # PEFT's T5 names select the same projections as ours, in every stack and both attentions.
    by_peft = lora.select_projections(paths, ("q", "v", "wi_0", "wo"))
    assert by_peft == lora.select_projections(paths, ("q", "v", "gate", "down"))
    assert {p.split("/", 3)[3] for p in by_peft} == {"attn/q", "attn/v", "cross_attn/q", "cross_attn/v", "mlp/gate", "mlp/down"}
    assert len(lora.select_projections(paths, (lora.ALL_LINEAR,))) == (
        cfg.n_layers * 7 + cfg.n_decoder_layers * 11)  # no head, no relative bias table

    # Step 0: B starts at zero, so the adapted model computes the base model bitwise.
    lora_cfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=(lora.ALL_LINEAR,))
    model = registry.build_model(cfg, rngs=nnx.Rngs(3), lora=lora_cfg)
    state = nnx.state(model, nnx.Param)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(state))
    flat.update({p: jax.numpy.asarray(v) for p, v in base_params.items()})
    nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(flat))
    nnx.update(model, state)
    enc, dec = _ids(cfg)
    np.testing.assert_array_equal(_ours(model, enc, dec), _ours(adapted_model(cfg, base_params, None), enc, dec))
    assert any(np.any(np.asarray(v)) for v in _adapter_arrays(model).values())  # A is random, only B is zero


@pytest.mark.parametrize("name", ["flan_t5", "t5_original"])
def test_our_t5_adapter_loads_in_peft_with_our_logits_and_merges_exactly(bases, name, tmp_path):
    path, cfg, base_params = bases[name]
    lora_cfg = lora.LoRAConfig(rank=3, alpha=6.0, rslora=name == "t5_original", targets=(lora.ALL_LINEAR,))
    model = adapted_model(cfg, base_params, lora_cfg)
    enc, dec = _ids(cfg)
    ours = _ours(model, enc, dec)

    peft.write_peft(tmp_path / "adapter", cfg, model, lora_cfg)
    written = json.loads((tmp_path / "adapter" / peft.ADAPTER_CONFIG).read_text())
    feed_forward = ["wi_0", "wi_1", "wo"] if name == "flan_t5" else ["wi", "wo"]
    assert written["task_type"] == "SEQ_2_SEQ_LM" and written["target_modules"] == sorted(["k", "o", "q", "v", *feed_forward])
    loaded = peft_lib.PeftModel.from_pretrained(_hf(path), tmp_path / "adapter").eval()
    assert type(loaded).__name__ == "PeftModelForSeq2SeqLM"
    np.testing.assert_allclose(t5_fakes.hf_logits(loaded, enc, dec), ours, **TOL)
    assert not np.allclose(t5_fakes.hf_logits(_hf(path), enc, dec), ours, atol=1e-2)  # the adapter changes the model

    # Merged (W + scale A B) here and exported: adapter-on-base, in transformers too.
    merged = lora.merged_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), lora.scales_of(model))
    np.testing.assert_allclose(_ours(adapted_model(cfg, traversals.flatten_mapping(merged), None), enc, dec), ours,
                               atol=2e-5, rtol=2e-5)
    convert.write_hf(tmp_path / "merged", cfg, merged)
    np.testing.assert_allclose(t5_fakes.hf_logits(_hf(tmp_path / "merged"), enc, dec), ours, **TOL)

    # And the folder imports back bitwise.
    expected = _adapter_arrays(model)
    back = peft.adapter_arrays(tmp_path / "adapter", cfg, lora_cfg, expected)
    assert back.keys() == expected.keys()
    for p in expected:
        np.testing.assert_array_equal(back[p], np.asarray(expected[p]), err_msg=str(p))


def test_t5_adapter_trained_in_torch_imports_with_the_same_logits(bases, tmp_path):
    path, cfg, base_params = bases["flan_t5"]
    torch.manual_seed(1)
    config = peft_lib.LoraConfig(r=4, lora_alpha=12, target_modules=["q", "v", "wi_1", "wo"], init_lora_weights=False,
                                 task_type="SEQ_2_SEQ_LM")
    torch_model = peft_lib.get_peft_model(_hf(path), config).eval()
    torch_model.save_pretrained(tmp_path / "torch_adapter")

    adapter_config = json.loads((tmp_path / "torch_adapter" / peft.ADAPTER_CONFIG).read_text())
    lora_cfg = peft.lora_config_of(adapter_config, cfg)
    plain = nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0)))
    chosen = lora.select_projections(lora.projection_paths(plain), lora_cfg.targets)
    assert {p.split("/", 3)[3] for p in chosen} == {"attn/q", "attn/v", "cross_attn/q", "cross_attn/v", "mlp/up", "mlp/down"}
    shell = nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora_cfg))
    arrays = peft.adapter_arrays(tmp_path / "torch_adapter", cfg, lora_cfg, _adapter_arrays(shell))
    model = adapted_model(cfg, base_params, lora_cfg, adapters=arrays)
    enc, dec = _ids(cfg, seed=5)
    np.testing.assert_allclose(_ours(model, enc, dec), t5_fakes.hf_logits(torch_model, enc, dec), **TOL)
