"""LoRA adapters <-> PEFT: our adapters loaded by peft onto the HF base compute our logits, the
merged export equals adapter-on-base, and adapters trained in torch import with the same parity.

Tiny random HF models built offline (as tests/test_convert.py); adapters get random A and B so a
wrong transpose, scale or key cannot hide behind B = 0.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
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
from tests.test_convert import HF_MODELS, hf_logits, random_ids, randomize  # noqa: E402

FAMILIES = ("llama3_gqa", "qwen2", "gemma", "gpt2")
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{family: (HF folder, our ModelConfig, our base params flat)} of randomized tiny models."""
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        model = HF_MODELS[name]().eval()
        randomize(model)
        path = tmp_path_factory.mktemp(f"base_{name}")
        model.save_pretrained(path)
        cfg, params = convert.load_hf_params(path)
        out[name] = (path, cfg.replace(attention="reference"), params)
    return out


def adapted_model(cfg, base_params, lora_cfg, adapters=None, seed=0):
    """Our model with LoRA: the base's weights, and `adapters` (flat) or random A and B."""
    model = nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora_cfg))
    state = nnx.state(model, nnx.Param)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(state))
    rng = np.random.default_rng(seed)
    for path, abstract in flat.items():
        if path in base_params:
            flat[path] = jnp.asarray(base_params[path])
        elif adapters is not None:
            flat[path] = jnp.asarray(adapters[path])
        else:
            flat[path] = jnp.asarray(0.2 * rng.standard_normal(abstract.shape), abstract.dtype)
    nnx.replace_by_pure_dict(state, traversals.unflatten_mapping(flat))
    nnx.update(model, state)
    return model


def logits(model, ids) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(ids)))


@nnx.jit
def _forward(model, ids):
    return model(ids)


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_our_adapter_loads_in_peft_with_our_logits_and_merges_exactly(bases, name, tmp_path):
    path, cfg, base_params = bases[name]
    lora_cfg = lora.LoRAConfig(rank=3, alpha=6.0, rslora=name == "qwen2",
                               targets=("q", "v", "o", "down") if name == "gemma" else (lora.ALL_LINEAR,))
    model = adapted_model(cfg, base_params, lora_cfg)
    ids = random_ids((2, 11))
    ours = logits(model, ids)

    peft.write_peft(tmp_path / "adapter", cfg, model, lora_cfg)
    written = json.loads((tmp_path / "adapter" / peft.ADAPTER_CONFIG).read_text())
    loaded = peft_lib.PeftModel.from_pretrained(hf_model(path), tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf_logits(loaded, ids), ours, **TOL)
    assert not np.allclose(hf_logits(hf_model(path), ids), ours, atol=1e-2)  # the adapter changes the model

    # Merged: the plain model with W + scale A B computes adapter-on-base, here and in transformers.
    merged = lora.merged_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), lora.scales_of(model))
    plain = adapted_model(cfg, traversals.flatten_mapping(merged), None)
    np.testing.assert_allclose(logits(plain, ids), ours, atol=2e-5, rtol=2e-5)
    convert.write_hf(tmp_path / "merged", cfg, merged)
    np.testing.assert_allclose(hf_logits(tmp_path / "merged", ids), ours, **TOL)

    # And the folder imports back bitwise (GPT-2's fused c_attn splits its block-diagonal B back).
    expected = {p: v for p, v in traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
                if lora.is_adapter_path(p)}
    back = peft.adapter_arrays(tmp_path / "adapter", cfg, lora_cfg, expected)
    assert back.keys() == expected.keys()
    for p in expected:
        np.testing.assert_array_equal(back[p], np.asarray(expected[p]), err_msg=str(p))
    if name == "gpt2":
        assert written["rank_pattern"] == {"c_attn": 9} and written["fan_in_fan_out"]


@pytest.mark.parametrize("name", ["llama3_gqa", "gpt2"])
def test_adapter_trained_in_torch_imports_with_the_same_logits(bases, name, tmp_path):
    path, cfg, base_params = bases[name]
    targets = ["c_attn", "c_fc"] if name == "gpt2" else ["q_proj", "k_proj", "down_proj"]
    torch.manual_seed(1)
    config = peft_lib.LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False,
                                 task_type="CAUSAL_LM", fan_in_fan_out=name == "gpt2", use_rslora=name == "gpt2")
    torch_model = peft_lib.get_peft_model(hf_model(path), config).eval()
    torch_model.save_pretrained(tmp_path / "torch_adapter")
    ids = random_ids((2, 9), seed=3)

    adapter_config = json.loads((tmp_path / "torch_adapter" / peft.ADAPTER_CONFIG).read_text())
    lora_cfg = peft.lora_config_of(adapter_config, cfg)
    plain = nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0)))
    assert set(lora.select_projections(lora.projection_paths(plain), lora_cfg.targets)) == {
        f"layers/{i}/{p}" for i in range(cfg.n_layers)
        for p in (("attn/q", "attn/k", "attn/v", "mlp/up") if name == "gpt2" else ("attn/q", "attn/k", "mlp/down"))
    }
    shell = nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora_cfg))
    expected = {p: v for p, v in traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(shell, nnx.Param))).items()
                if lora.is_adapter_path(p)}
    arrays = peft.adapter_arrays(tmp_path / "torch_adapter", cfg, lora_cfg, expected)
    model = adapted_model(cfg, base_params, lora_cfg, adapters=arrays)
    np.testing.assert_allclose(logits(model, ids), hf_logits(torch_model, ids), **TOL)


def test_bad_peft_folders_are_refused_by_name(bases, tmp_path):
    path, cfg, base_params = bases["llama3_gqa"]
    lora_cfg = lora.LoRAConfig(rank=2, alpha=4.0, targets=("q", "v"))
    model = adapted_model(cfg, base_params, lora_cfg)
    good = tmp_path / "good"
    peft.write_peft(good, cfg, model, lora_cfg)
    expected = {p: v for p, v in traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
                if lora.is_adapter_path(p)}

    def variant(name, **changes):
        folder = tmp_path / name
        folder.mkdir()
        config = {**json.loads((good / peft.ADAPTER_CONFIG).read_text()), **changes}
        (folder / peft.ADAPTER_CONFIG).write_text(json.dumps(config))
        (folder / peft.ADAPTER_WEIGHTS).write_bytes((good / peft.ADAPTER_WEIGHTS).read_bytes())
        return folder

    with pytest.raises(peft.PeftFormatError, match="peft_type 'IA3' is not supported"):
        peft.adapter_arrays(variant("ia3", peft_type="IA3"), cfg, lora_cfg, expected)
    with pytest.raises(peft.PeftFormatError, match="use_dora"):
        peft.adapter_arrays(variant("dora", use_dora=True), cfg, lora_cfg, expected)
    with pytest.raises(peft.PeftFormatError, match=r"config.lora.rank=2"):
        peft.adapter_arrays(good, cfg, lora.LoRAConfig(rank=3, alpha=4.0, targets=("q", "v")), expected)
    with pytest.raises(peft.PeftFormatError, match=r"adapts other projections.*lacks: \['layers/0/attn/k"):
        peft.adapter_arrays(good, cfg, lora.LoRAConfig(rank=2, alpha=4.0, targets=("q", "k", "v")), {
            **expected, **{(*p[:3], "k", p[4]): v for p, v in expected.items() if p[3] == "q"}})
    # Another base: d_model 48 instead of 32; the error names the tensor.
    wider = cfg.replace(d_model=48)
    with pytest.raises(peft.PeftFormatError, match=r"tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight "
                                                  r"has shape \(2, 32\), this base needs \(2, 48\)"):
        peft.adapter_arrays(good, wider, lora_cfg, expected)
    # Another family: GPT-2's module names.
    gpt2_cfg = bases["gpt2"][1]
    with pytest.raises(peft.PeftFormatError, match="not a LoRA weight of a projection of this gpt2 model"):
        peft.adapter_arrays(good, gpt2_cfg, lora_cfg, expected)
    with pytest.raises(ValueError, match=r"also trained parameters that are not LoRA adapters \(\['final_norm/scale'\]\).*--to_hf"):
        peft.write_peft(tmp_path / "with_norm", cfg, model, lora_cfg, provenance={"other_trained": ["final_norm/scale"]})
    assert not (tmp_path / "with_norm").exists()
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / peft.ADAPTER_CONFIG).write_text((good / peft.ADAPTER_CONFIG).read_text())
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        peft.read_peft(tmp_path / "pickled")
