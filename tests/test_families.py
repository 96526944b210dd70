"""The families beyond Llama: greedy decoding vs transformers, soft-capping's kernel choice, refusals.

Logit parity (plain and packed) and the exact HF round trip of every family run in test_convert.py
(its HF_MODELS); here each family's KV-cache decoding is checked against transformers' own
`generate`, and the explicit choices and refusals the new families brought.
"""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flan_jax import convert  # noqa: E402
from flan_jax import model as fm  # noqa: E402
from flan_jax.model import hf_config  # noqa: E402
from flan_jax.model.generate import generate_arrays  # noqa: E402

from test_convert import HF_MODELS, our_model, randomize  # noqa: E402

NEW_FAMILIES = ["qwen3_qk_norm", "qwen3_sliding_layers", "gemma2_softcap", "gemma3_local_rope", "phi3_fused_window",
                "olmo2_post_norms"]
PROMPTS = [[5, 9, 3, 17, 22, 40, 41], [7, 1, 60]]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The new families' tiny random HF models of test_convert (and Gemma 1, for a refusal)."""
    out = {}
    for name in [*NEW_FAMILIES, "gemma"]:
        torch.manual_seed(0)
        model = HF_MODELS[name]().eval()
        randomize(model)
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    return out


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_greedy_generation_equals_transformers_generate(hf_dirs, name):
    cfg, params = convert.load_hf_params(hf_dirs[name])
    model = our_model(cfg, params)
    ours = generate_arrays(model, PROMPTS, max_new_tokens=8, eos_id=-1)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name], attn_implementation="eager").eval()
    for prompt, tokens in zip(PROMPTS, ours.tokens):
        with torch.no_grad():
            theirs = reference.generate(torch.as_tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)[0, len(prompt):]
        assert tokens.tolist() == theirs.tolist(), name
    assert len({tuple(t) for t in ours.tokens.tolist()}) > 1


def test_soft_capped_attention_takes_the_einsum_path_whatever_the_kernel_setting():
    """Neither the CPU causal-block kernel nor jax.nn.dot_product_attention can cap scores, so a
    soft-capped model computes the same (capped) attention under every `attention` setting, and
    its gradient is autodiff of that einsum path."""
    base = fm.ModelConfig.for_family("gemma2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                     head_dim=8, d_ff=48, max_positions=64, attn_softcap=1.5, final_softcap=4.0,
                                     query_scale=12.0, init_std=0.3)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))
    outputs, grads = {}, {}
    for attention in ("reference", "xla", "cudnn"):
        graphdef, state = nnx.split(fm.Transformer(base.replace(attention=attention), rngs=nnx.Rngs(0)))
        loss = jax.jit(lambda s, graphdef=graphdef: nnx.merge(graphdef, s)(ids).sum())
        outputs[attention] = np.asarray(nnx.merge(graphdef, state)(ids))
        grads[attention] = jax.jit(jax.grad(loss))(state)
    assert np.abs(outputs["reference"]).max() <= 4.0  # the final cap holds
    for attention in ("xla", "cudnn"):
        np.testing.assert_array_equal(outputs[attention], outputs["reference"])
        for a, b in zip(jax.tree.leaves(grads[attention]), jax.tree.leaves(grads["reference"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    uncapped = fm.Transformer(base.replace(attn_softcap=0.0, final_softcap=0.0), rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(uncapped(ids)) - outputs["reference"]).max() > 1e-2  # capping changes the model


def test_sft_loss_of_a_soft_capped_model_uses_the_capped_logits():
    from flan_jax import default_config
    from flan_jax.train import losses
    from flan_jax.train.objectives import get_objective

    cfg = fm.ModelConfig.for_family("gemma2", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    head_dim=16, d_ff=48, max_positions=32, final_softcap=2.0, init_std=0.5)
    model = fm.Transformer(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    batch = {"input_tokens": jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32),
             "target_tokens": jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32),
             "positions": jnp.tile(jnp.arange(8, dtype=jnp.int32), (2, 1)), "segment_ids": jnp.ones((2, 8), jnp.int32),
             "loss_weights": jnp.ones((2, 8), jnp.float32), "prefix_mask": jnp.zeros((2, 8), jnp.int32)}
    objective = get_objective(default_config.get_config())
    prepared = objective.prepare(batch)
    loss, _ = objective.loss_sum(types.SimpleNamespace(model=model, rng=None), {**batch, **prepared.features})
    logits = model(batch["input_tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    expected = losses.cross_entropy(logits, batch["target_tokens"]).sum()
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"model_type": "gemma", "use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}}, "'longrope'"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 4, "layer_types": ["chunked_attention"] * 2},
     "'chunked_attention'"),
])
def test_unimplemented_features_are_refused_by_name_before_anything_is_written(hf_dirs, tmp_path, capsys, change, message):
    from flan_jax.convert.__main__ import main

    source = {"gemma2": "gemma2_softcap", "gemma": "gemma", "phi3": "phi3_fused_window", "qwen3": "qwen3_qk_norm"}[change["model_type"]]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes((hf_dirs[source] / "model.safetensors").read_bytes())
    config = {**json.loads((hf_dirs[source] / "config.json").read_text()), **change}
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_config.UnsupportedConfigError, match=message):
        fm.ModelConfig.from_hf_config(config)
    assert main([f"--from_hf={hf}", f"--out={tmp_path / 'out'}"]) == 2
    assert message.split("=")[0].strip("'") in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
