"""HF import/export, proven by logit parity with transformers on tiny random models built offline."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flan_jax import convert  # noqa: E402
from flan_jax import model as fm  # noqa: E402
from flan_jax.convert import checkpoint, hf_import  # noqa: E402
from flan_jax.model import hf_config  # noqa: E402

VOCAB = 96
LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# Per-layer attention kinds (the HF defaults alternate them too): sliding then full for Gemma 2,
# and for Gemma 3 sliding layers around a full one, each kind with its own rope.
GEMMA2_LAYERS = ["sliding_attention", "full_attention"]
GEMMA3_LAYERS = ["sliding_attention", "full_attention"]

HF_MODELS = {
    "llama3_gqa": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**LLAMA_SIZES, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama_tied_bias": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**LLAMA_SIZES, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "mistral_window": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**LLAMA_SIZES, sliding_window=4, head_dim=8)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLAMA_SIZES)),
    "gemma": lambda: transformers.GemmaForCausalLM(
        transformers.GemmaConfig(**{**LLAMA_SIZES, "num_key_value_heads": 1}, head_dim=8)),
    "qwen3_qk_norm": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**LLAMA_SIZES, head_dim=8)),
    "qwen3_sliding_layers": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **LLAMA_SIZES, head_dim=8, use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "gemma2_softcap": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **LLAMA_SIZES, head_dim=8, query_pre_attn_scalar=12, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        sliding_window=4, layer_types=GEMMA2_LAYERS)),
    "gemma3_local_rope": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **LLAMA_SIZES, head_dim=8, query_pre_attn_scalar=8, sliding_window=3, layer_types=GEMMA3_LAYERS,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}})),
    "phi3_fused_window": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **LLAMA_SIZES, sliding_window=5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "olmo2_post_norms": lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        **LLAMA_SIZES, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)),
}


def randomize(model) -> None:
    """Weights large enough that a wrong transpose or norm cannot hide below the tolerance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    out = {}
    for name, build in HF_MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        randomize(model)
        path = tmp_path_factory.mktemp(name)
        # The Llama model is saved in small shards to exercise the shard index.
        model.save_pretrained(path, max_shard_size="40KB" if name == "llama3_gqa" else "50GB")
        out[name] = path
    return out


def hf_logits(path_or_model, ids: np.ndarray) -> np.ndarray:
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(path_or_model, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def our_model(cfg: fm.ModelConfig, params) -> fm.Transformer:
    model = nnx.eval_shape(lambda: fm.Transformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpoint.nest({p: jnp.asarray(v) for p, v in checkpoint.flatten(params).items()}))
    nnx.update(model, state)
    return model


def random_ids(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_import_matches_transformers_logits(hf_dirs, name):
    cfg, params = convert.load_hf_params(hf_dirs[name])
    cfg = cfg.replace(attention="reference")
    model = our_model(cfg, params)
    ids = random_ids((2, 12))
    reference = hf_logits(hf_dirs[name], ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), reference, atol=1e-4, rtol=1e-4)

    # Several sequences packed in one row: each segment equals transformers on it alone.
    lengths = [5, 9, 4]
    seqs = [random_ids((1, n), seed=10 + i) for i, n in enumerate(lengths)]
    total = sum(lengths) + 2
    tokens, segments, positions = (np.zeros((1, total), np.int32) for _ in range(3))
    start = 0
    for i, seq in enumerate(seqs):
        n = seq.shape[1]
        tokens[0, start:start + n], segments[0, start:start + n], positions[0, start:start + n] = seq, i + 1, np.arange(n)
        start += n
    for attention in ("reference", "xla"):
        packed = np.asarray(our_model(cfg.replace(attention=attention), params)(
            jnp.asarray(tokens), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments)))
        start = 0
        for seq in seqs:
            n = seq.shape[1]
            np.testing.assert_allclose(packed[:, start:start + n], hf_logits(hf_dirs[name], seq), atol=1e-4, rtol=1e-4)
            start += n


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_export_loads_in_transformers_and_round_trips_bitwise(hf_dirs, name, tmp_path):
    cfg = fm.ModelConfig.from_hf_config(json.loads((hf_dirs[name] / "config.json").read_text()))
    cfg = cfg.replace(init_std=0.15, attention="reference")
    model = fm.Transformer(cfg, rngs=nnx.Rngs(3))  # our own random weights, not the imported ones
    params = nnx.state(model, nnx.Param)
    convert.write_hf(tmp_path, cfg, params)

    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = random_ids((2, 12), seed=5)
    np.testing.assert_allclose(hf_logits(loaded.eval(), ids), np.asarray(model(jnp.asarray(ids))), atol=1e-4, rtol=1e-4)

    cfg_back, params_back = convert.load_hf_params(tmp_path)
    assert cfg_back == cfg.replace(init_std=cfg_back.init_std, attention=cfg_back.attention)
    original = checkpoint.flatten(params)
    assert set(params_back) == set(original)
    for path, value in original.items():
        assert params_back[path].dtype == np.asarray(value).dtype
        assert np.array_equal(params_back[path], np.asarray(value)), path  # bitwise


def test_scanned_layout_imports_exports_and_stores_like_the_unrolled_one(hf_dirs, tmp_path):
    """HF -> a scanned model (stacked layers) matches transformers; it exports and stores bitwise."""
    from flan_jax.model import layout

    cfg, flat = convert.load_hf_params(hf_dirs["llama3_gqa"])
    cfg = cfg.replace(attention="reference", scan_layers=True)
    model = our_model(cfg, layout.stack(checkpoint.nest(flat)))
    assert model.layers.attn.q.kernel.shape[0] == cfg.n_layers
    ids = random_ids((2, 12))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf_dirs["llama3_gqa"], ids), atol=1e-4, rtol=1e-4)

    params = nnx.state(model, nnx.Param)
    convert.write_hf(tmp_path / "hf", cfg, params)
    _, back = convert.load_hf_params(tmp_path / "hf")
    assert set(back) == set(flat) and all(np.array_equal(back[p], flat[p]) for p in flat)  # bitwise, per layer

    convert.save_converted(tmp_path / "converted", cfg, params)  # stored per layer, whatever the layout
    assert (tmp_path / "converted" / "params" / "layers.1").is_dir()
    cfg_back, stored = convert.load_converted(tmp_path / "converted")
    assert cfg_back.scanned
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(stored)), jax.tree.leaves(nnx.to_pure_dict(params))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    _, unrolled = convert.load_converted(tmp_path / "converted", stacked=False)
    assert set(checkpoint.flatten(unrolled)) == set(flat)


# Deeper models whose per-layer kinds exercise every way the scanned stack runs: Gemma 3's pattern
# (2 local + 1 global) scanned in 2 groups with one layer left over, Gemma 2's alternation in 2
# groups with soft-capping and sandwich norms, Qwen3's full layers then sliding ones (never
# repeating: one scan per run), OLMo 2's post-norms and full QK-norm.
SCAN_FAMILIES = {
    "gemma3_pattern": (lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **{**LLAMA_SIZES, "num_hidden_layers": 7}, head_dim=8, query_pre_attn_scalar=8, sliding_window=3,
        layer_types=(["sliding_attention"] * 2 + ["full_attention"]) * 2 + ["sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}})),
        [(0, 2, 3), (6, 1, 1)]),
    "gemma2_alternating": (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **{**LLAMA_SIZES, "num_hidden_layers": 4}, head_dim=8, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, sliding_window=4, layer_types=GEMMA2_LAYERS * 2)),
        [(0, 2, 2)]),
    "qwen3_full_then_sliding": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **{**LLAMA_SIZES, "num_hidden_layers": 5}, head_dim=8, use_sliding_window=True, sliding_window=3,
        max_window_layers=2)),
        [(0, 2, 1), (2, 3, 1)]),
    "olmo2_post_norms": (lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
        **{**LLAMA_SIZES, "num_hidden_layers": 3}, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
        [(0, 3, 1)]),
}


@pytest.mark.parametrize("name", list(SCAN_FAMILIES))
def test_scanned_families_with_per_layer_kinds_match_transformers(name, tmp_path):
    """Per-layer kinds (sliding / global windows, Gemma 3's local rope base) in a scanned model:
    logits equal transformers' and the unrolled model's, the plan scans what it should, and the
    KV-cache generator (one stacked cache, one mask per kind) decodes what the unrolled one does."""
    from flan_jax.model import generate, layer_stack, layout, transformer

    build, expected_plan = SCAN_FAMILIES[name]
    torch.manual_seed(0)
    hf = build().eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    cfg, flat = convert.load_hf_params(tmp_path)
    assert layer_stack.plan(transformer.layer_kinds(cfg)) == expected_plan
    unrolled = our_model(cfg.replace(scan_layers=False), flat)
    scanned = our_model(cfg.replace(scan_layers=True), layout.stack(checkpoint.nest(flat)))
    ids = random_ids((2, 12), seed=3)
    got = np.asarray(scanned(jnp.asarray(ids)))
    np.testing.assert_allclose(got, hf_logits(hf, ids), atol=1e-4, rtol=1e-4)
    # Scanned and unrolled programs fuse differently, so float32 sums run in another order; how far
    # that moves the logits depends on the host's matmul kernels (2e-5 of logits ~4 on a Zen 3 CPU
    # without AVX-512): a tolerance relative to the logits' scale, tighter than the HF check's.
    scale = float(np.abs(got).max())
    np.testing.assert_allclose(got, np.asarray(unrolled(jnp.asarray(ids))), atol=2e-5 * scale, rtol=1e-5)
    prompts = [[5, 9, 3, 17, 22, 40, 41], [7, 1, 60]]
    a = generate.generate_arrays(scanned, prompts, max_new_tokens=6, eos_id=-1, return_logits=True)
    b = generate.generate_arrays(unrolled, prompts, max_new_tokens=6, eos_id=-1, return_logits=True)
    assert a.tokens.tolist() == b.tokens.tolist()
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-4, rtol=1e-4)


def test_cli_round_trip_with_shards_and_tokenizer_files(hf_dirs, tmp_path):
    from flan_jax.convert.__main__ import main

    source = hf_dirs["llama3_gqa"]
    assert (source / "model.safetensors.index.json").is_file()  # sharded on purpose
    hf_copy = tmp_path / "hf"
    hf_copy.mkdir()
    for f in source.iterdir():
        (hf_copy / f.name).write_bytes(f.read_bytes())
    (hf_copy / "tokenizer.json").write_text('{"fake": true}')
    (hf_copy / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')

    assert main([f"--from_hf={hf_copy}", f"--out={tmp_path / 'ours'}"]) == 0
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == '{"fake": true}'
    cfg, params = convert.load_converted(tmp_path / "ours")
    assert cfg.rope_scaling == "llama3" and cfg.n_kv_heads == 2
    _, direct = convert.load_hf_params(hf_copy)
    flat = checkpoint.flatten(params)
    assert set(flat) == set(direct) and all(np.array_equal(flat[p], direct[p]) for p in direct)
    # The printed config.model overrides make an experiment config describe exactly this model.
    from flan_jax import default_config

    experiment = default_config.get_config()
    experiment.model.update(convert.config_model_overrides(cfg))
    assert fm.ModelConfig.from_config(experiment.model) == cfg
    assert "config.model.rope_scaling = 'llama3'" in (tmp_path / "ours" / "config_overrides.py.txt").read_text()
    cfg32, params32 = convert.load_converted(tmp_path / "ours", dtype="bfloat16")
    assert all(np.asarray(v).dtype == jnp.bfloat16 for v in checkpoint.flatten(params32).values())

    assert main([f"--to_hf={tmp_path / 'back'}", f"--checkpoint={tmp_path / 'ours'}"]) == 0
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()
    ids = random_ids((1, 10), seed=9)
    np.testing.assert_allclose(hf_logits(tmp_path / "back", ids), hf_logits(source, ids), atol=1e-5)

    # Sharded export (tiny shard size): transformers reads the index; the round trip stays bitwise.
    convert.write_hf(tmp_path / "sharded", cfg, params, max_shard_bytes=30_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    np.testing.assert_allclose(hf_logits(tmp_path / "sharded", ids), hf_logits(source, ids), atol=1e-5)
    _, resharded = convert.load_hf_params(tmp_path / "sharded")
    assert all(np.array_equal(resharded[p], direct[p]) for p in direct)


def test_bf16_checkpoint_stays_bf16_and_converts(hf_dirs, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["qwen2"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = convert.load_hf_params(tmp_path / "hf")
    assert all(v.dtype == jnp.bfloat16 for v in params.values())
    ids = random_ids((1, 8))
    ours = np.asarray(our_model(cfg.replace(dtype="bfloat16"), params)(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, hf_logits(model, ids), atol=0.1)  # bf16 compute on both sides


def test_pickle_weights_are_refused_without_unpickling(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(convert.RefusedCheckpointError, match="safe_serialization=True"):
        hf_import.safetensors_files(tmp_path)
    from flan_jax.convert.__main__ import main

    assert main([f"--from_hf={tmp_path}", f"--out={tmp_path / 'out'}"]) == 2
    assert "save_pretrained('OUT', safe_serialization=True)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_tensors_and_unsupported_configs_are_errors(hf_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    source = hf_dirs["qwen2"]
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    save_file({**tensors, "model.layers.0.extra.weight": np.zeros(3, np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="extra.weight"):
        convert.load_hf_params(tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.up_proj"):
        convert.load_hf_params(tmp_path)

    with pytest.raises(hf_config.UnsupportedConfigError, match="bert"):
        fm.ModelConfig.from_hf_config({"model_type": "bert"})
    with pytest.raises(hf_config.UnsupportedConfigError, match="yarn"):
        fm.ModelConfig.from_hf_config({**json.loads((source / "config.json").read_text()),
                                       "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}})
    qwen = fm.ModelConfig.for_family("qwen2", out_bias=True)
    with pytest.raises(hf_config.UnsupportedConfigError, match="out_bias"):
        hf_config.to_hf(qwen)


def test_writer_saves_each_layer_as_soon_as_it_is_complete(tmp_path):
    cfg = fm.ModelConfig.for_family("llama", vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                                    head_dim=8, d_ff=24)
    params = checkpoint.flatten(nnx.state(fm.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    writer = checkpoint.StreamingWriter(tmp_path / "out", cfg)
    layer0 = [p for p in params if p[:2] == ("layers", 0)]
    for path in layer0[:-1]:
        writer.add(path, np.asarray(params[path]))
    assert not (tmp_path / "out" / "params" / "layers.0").exists()
    writer.add(layer0[-1], np.asarray(params[layer0[-1]]))
    assert (tmp_path / "out" / "params" / "layers.0").is_dir()  # written (and freed) before the rest arrive
    with pytest.raises(ValueError, match="shape"):
        writer.add(("embed",), np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="missing parameters"):
        writer.close()
    assert not (tmp_path / "out" / "model_config.json").exists()  # an incomplete conversion is not loadable


def test_to_hf_from_a_training_workdir(tmp_path):
    """A workdir checkpoint in the trainer's layout (params + config items) exports and loads in HF."""
    import orbax.checkpoint as ocp

    from flan_jax import default_config
    from flan_jax.convert.__main__ import main
    from flan_jax.train import checkpointing

    config = default_config.get_config()
    config.model.update(family="gemma", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1,
                        head_dim=8, d_ff=48, max_positions=64)
    cfg = fm.ModelConfig.from_config(config.model)
    model = fm.Transformer(cfg.replace(init_std=0.15), rngs=nnx.Rngs(4))
    manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
    manager.save(7, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        config=ocp.args.JsonSave(checkpointing.config_to_dict(config))))
    manager.wait_until_finished()
    manager.close()
    (tmp_path / "run" / "tokenizer.model").write_bytes(b"sp model bytes")

    assert main([f"--to_hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}", "--step=7"]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"sp model bytes"
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = random_ids((1, 10), seed=2)
    np.testing.assert_allclose(hf_logits(loaded.eval(), ids), np.asarray(model(jnp.asarray(ids))), atol=1e-4, rtol=1e-4)


def test_hf_config_reading_follows_transformers_conventions(hf_dirs):
    gemma = json.loads((hf_dirs["gemma"] / "config.json").read_text())
    assert fm.ModelConfig.from_hf_config({**gemma, "hidden_act": "gelu"}).activation == "gelu_tanh"  # legacy Gemma value
    llama = json.loads((hf_dirs["llama_tied_bias"] / "config.json").read_text())
    legacy = {k: v for k, v in llama.items() if k != "rope_parameters"}  # transformers 4 layout
    legacy.update(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    cfg = fm.ModelConfig.from_hf_config(legacy)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor) == (5e5, "linear", 4.0)
    assert cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias and cfg.tie_embeddings
