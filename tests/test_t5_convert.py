"""T5 conversion: `python -m flan_jax.convert --from_hf / --to_hf` for T5ForConditionalGeneration,
proven on tiny random models built offline (logits, exact round trips, clean loading info, refusals)."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flan_jax import convert, default_config  # noqa: E402
from flan_jax.convert import checkpoint  # noqa: E402
from flan_jax.model import registry, t5  # noqa: E402
from flan_jax.model.t5_config import T5Config, UnsupportedT5ConfigError  # noqa: E402
from tests import t5_fakes  # noqa: E402


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    out = {}
    for name in ("flan_t5", "t5_original", "mt5"):
        path = tmp_path_factory.mktemp(name)
        t5_fakes.build_hf(name).save_pretrained(path)
        out[name] = path
    return out


def _our_model(cfg, params):
    model = nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpoint.nest({p: np.asarray(v) for p, v in checkpoint.flatten(params).items()}))
    nnx.update(model, state)
    return model


def _hf_model(path):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(path, output_loading_info=True)


@pytest.mark.parametrize("name", ["flan_t5", "t5_original", "mt5"])
def test_cli_import_gives_transformers_logits_and_exports_back_exactly(hf_dirs, name, tmp_path):
    from flan_jax.convert.__main__ import main

    assert main([f"--from_hf={hf_dirs[name]}", f"--out={tmp_path / 'ours'}"]) == 0
    cfg, params = convert.load_converted(tmp_path / "ours")
    assert cfg.family == "t5"
    hf, info = _hf_model(hf_dirs[name])
    enc, dec = t5_fakes.random_ids((2, 9), 1, cfg.vocab_size), t5_fakes.random_ids((2, 5), 2, cfg.vocab_size)
    ours = t5_fakes.logits(_our_model(cfg, params), encoder_input_tokens=enc, decoder_input_tokens=dec)
    np.testing.assert_allclose(ours, t5_fakes.hf_logits(hf.eval(), enc, dec), atol=1e-4, rtol=1e-4)

    # The printed overrides make an experiment config describe exactly this architecture.
    experiment = default_config.get_config()
    experiment.model.update(convert.config_model_overrides(cfg))
    assert registry.config_from(experiment.model) == cfg.replace(dropout_rate=0.0)  # dropout is a runtime field
    assert "config.model.family = 't5'" in (tmp_path / "ours" / "config_overrides.py.txt").read_text()

    assert main([f"--to_hf={tmp_path / 'back'}", f"--checkpoint={tmp_path / 'ours'}"]) == 0
    back, info = _hf_model(tmp_path / "back")
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    np.testing.assert_allclose(t5_fakes.hf_logits(back.eval(), enc, dec), t5_fakes.hf_logits(hf, enc, dec), atol=1e-6)
    _, again = convert.load_hf_params(tmp_path / "back")
    flat = checkpoint.flatten(params)
    assert set(again) == set(flat) and all(np.array_equal(again[p], np.asarray(flat[p])) for p in flat)


@pytest.mark.parametrize("family,tied,scaled", [("t5", False, False), ("t5_original", True, True), ("t5", True, False)])
def test_our_weights_export_load_cleanly_and_round_trip_bitwise(family, tied, scaled, tmp_path):
    cfg = T5Config.for_family(family, vocab_size=80, d_model=24, n_layers=2, n_decoder_layers=1, n_heads=3, head_dim=8,
                              d_ff=40, relative_buckets=8, relative_max_distance=16, tie_embeddings=tied,
                              scale_decoder_outputs=scaled, init_scale=3.0)
    model = nnx.jit(lambda: t5.T5(cfg, rngs=nnx.Rngs(3)))()
    params = nnx.state(model, nnx.Param)
    convert.write_hf(tmp_path, cfg, params)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["model_type"] == "t5" and stored["decoder_start_token_id"] == 0 and stored["eos_token_id"] == 1

    hf, info = _hf_model(tmp_path)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert (hf.lm_head.weight.data_ptr() == hf.shared.weight.data_ptr()) == tied
    enc, dec = t5_fakes.random_ids((2, 10), 5, cfg.vocab_size), t5_fakes.random_ids((2, 6), 6, cfg.vocab_size)
    np.testing.assert_allclose(t5_fakes.hf_logits(hf.eval(), enc, dec),
                               t5_fakes.logits(model, encoder_input_tokens=enc, decoder_input_tokens=dec), atol=1e-4, rtol=1e-4)

    cfg_back, params_back = convert.load_hf_params(tmp_path)
    assert cfg_back == cfg.replace(init_scale=cfg_back.init_scale) or cfg_back == cfg
    original = checkpoint.flatten(params)
    assert set(params_back) == set(original)
    assert all(np.array_equal(params_back[p], np.asarray(v)) and params_back[p].dtype == np.asarray(v).dtype for p, v in original.items())


def test_transformers_4_hub_config_of_flan_t5_reads_untied_and_unscaled():
    hub = {  # google/flan-t5-small's config.json (transformers 4 layout, no scale_decoder_outputs)
        "architectures": ["T5ForConditionalGeneration"], "d_ff": 1024, "d_kv": 64, "d_model": 512,
        "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
        "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
        "num_decoder_layers": 8, "num_heads": 6, "num_layers": 8, "output_past": True, "pad_token_id": 0,
        "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False, "vocab_size": 32128,
    }
    cfg = T5Config.from_hf_config(hub, tensor_names=None)
    assert (cfg.tie_embeddings, cfg.scale_decoder_outputs, cfg.gated_mlp, cfg.activation) == (False, False, True, "gelu_tanh")
    assert (cfg.n_layers, cfg.n_decoder_layers, cfg.n_heads, cfg.d_ff, cfg.dropout_rate) == (8, 8, 6, 1024, 0.1)
    assert cfg.num_params == 76_961_152  # flan-t5-small's parameter count


@pytest.mark.parametrize("change,named", [
    ({"architectures": ["T5EncoderModel"]}, "T5EncoderModel"),
    ({"feed_forward_proj": "gated-quick_gelu"}, "quick_gelu"),
    ({"feed_forward_proj": "double-gated-gelu"}, "double-gated-gelu"),
    ({"is_decoder": True}, "is_decoder"),
    ({"tie_encoder_decoder": True}, "tie_encoder_decoder"),
    ({"model_type": "umt5"}, "umt5"),
])
def test_unsupported_t5_features_are_refused_by_name_before_anything_is_written(hf_dirs, change, named, tmp_path, capsys):
    from flan_jax.convert.__main__ import main

    source = tmp_path / "hf"
    source.mkdir()
    for f in hf_dirs["flan_t5"].iterdir():
        (source / f.name).write_bytes(f.read_bytes())
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **change}))
    assert main([f"--from_hf={source}", f"--out={tmp_path / 'out'}"]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_gated_exact_gelu_is_refused_on_export(tmp_path):
    cfg = T5Config(vocab_size=64, d_model=16, n_layers=1, n_decoder_layers=1, n_heads=2, head_dim=8, d_ff=32, activation="gelu")
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: t5.T5(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    with pytest.raises(UnsupportedT5ConfigError, match="exact GELU"):
        convert.write_hf(tmp_path / "out", cfg, params)


def test_bad_t5_folders_name_tensor_file_and_fields_and_leave_nothing(hf_dirs, tmp_path, capsys):
    """T5 conversion goes through the same checks and staged writer as the decoder's
    (tests/test_convert_errors.py): a shape the config does not imply names the tensor, the file
    and the T5 config fields; a failure after layers were written leaves no checkpoint."""
    from safetensors.numpy import load_file, save_file

    from tests.test_convert_errors import convert_fails, copy_of

    hf = copy_of(hf_dirs["flan_t5"], tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "d_ff": 40}))
    err = convert_fails(hf, tmp_path / "out", capsys)
    assert "DenseReluDense.wi_0.weight' has shape (48, 32)" in err and "d_model=32, d_ff=40" in err, err
    assert str(hf / "model.safetensors") in err and str(hf / "config.json") in err

    (hf / "config.json").write_text(json.dumps(config))
    tensors = load_file(hf / "model.safetensors")
    del tensors["decoder.final_layer_norm.weight"]
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    assert "decoder.final_layer_norm.weight" in convert_fails(hf, tmp_path / "out", capsys)
