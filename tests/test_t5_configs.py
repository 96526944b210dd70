"""configs/flan_t5.py's published FLAN-T5 shapes against transformers, and the T5 demo config."""

from __future__ import annotations

import importlib.util

import pytest

from flan_jax.model import registry
from tests import train_fakes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Parameter counts of google/flan-t5-{small,...,xxl} (shared embedding and untied head included).
PUBLISHED = {"small": 76_961_152, "base": 247_577_856, "large": 783_150_080, "xl": 2_849_757_184, "xxl": 11_135_332_352}


def _load(name):
    spec = importlib.util.spec_from_file_location(name, train_fakes.ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_flan_t5_sizes_are_the_published_models(size):
    config = _load("flan_t5").get_config(size)
    cfg = registry.config_from(config.model)
    hf_config = transformers.T5Config(  # the fields of google/flan-t5-<size>'s config.json
        vocab_size=32128, d_model=cfg.d_model, d_kv=64, d_ff=cfg.d_ff, num_layers=cfg.n_layers,
        num_decoder_layers=cfg.n_decoder_layers, num_heads=cfg.n_heads, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.1,
    )
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(hf_config)
    hf_params = sum(p.numel() for p in hf.parameters()) + hf.shared.weight.numel()  # + the untied head
    assert cfg.num_params == hf_params == PUBLISHED[size]
    expected = registry.hf_family("t5").hf.config_from_hf(hf_config.to_dict(), {"lm_head.weight"})
    assert cfg.replace(dtype="float32", remat="none") == expected


def test_flan_t5_rejects_an_unknown_size():
    with pytest.raises(ValueError, match="xxxl"):
        _load("flan_t5").get_config("xxxl")


def test_t5_demo_is_about_the_decoder_demos_size_and_evaluates_the_same_tasks():
    t5_config, decoder_config = _load("flan_t5_demo").get_config(), _load("demo").get_config()
    t5_params = registry.config_from(t5_config.model).num_params
    decoder_params = registry.config_from(decoder_config.model).num_params
    assert 0.8 < t5_params / decoder_params < 1.3
    assert t5_config.eval.mixtures == decoder_config.eval.mixtures
    assert t5_config.data.train_mixture == decoder_config.data.train_mixture
