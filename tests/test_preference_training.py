"""Preference runs through the trainer: SFT -> DPO / reward model, the reference cache, micro-batches."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import flan_jax_tasks  # noqa: F401  (registers the built-in tasks and pairs)
from flan_jax.train import loop, reference_cache
from tests import train_fakes

PAIRS = {"data.train_mixture": "synthetic_pairs_train", "data.seq_len": 96, "data.batch_size": 16}


def _config(tokenizer_path, **overrides):
    values = train_fakes.demo_overrides(tokenizer_path, **{k.replace(".", "__"): v for k, v in overrides.items()})
    return train_fakes.demo_config(values)


def _losses(workdir, key="loss"):
    return [json.loads(line)[key] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory, tokenizer_path, cache_dir):
    workdir = tmp_path_factory.mktemp("sft")
    loop.train(_config(tokenizer_path, **{"train.num_steps": 2}), workdir)
    (workdir / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())  # as if the run had trained it
    return workdir


def test_dpo_from_an_sft_workdir_cached_reference_equals_the_frozen_one_also_in_micro_batches(
    tmp_path, tokenizer_path, sft_workdir, cache_dir
):
    common = {**PAIRS, "objective.name": "dpo", "checkpoint.init_from": str(sft_workdir), "train.num_steps": 3,
              "data.tokenizer.path": ""}  # the SFT run's tokenizer
    cached = loop.train(_config(tokenizer_path, **common), tmp_path / "cached")
    meta = json.loads((tmp_path / "cached" / reference_cache.CACHE_DIR / reference_cache.META).read_text())
    assert meta["steps"] == 3 and meta["pairs"] > 0 and set(meta["fingerprint"]) == {"reference", "tokenizer", "data"}
    frozen = loop.train(
        _config(tokenizer_path, **common, **{"objective.reference": "model", "optimizer.grad_accum_steps": 2}),
        tmp_path / "frozen",
    )
    for key in ("loss", "rewards/chosen", "rewards/margin", "logps/drift"):
        np.testing.assert_allclose(_losses(tmp_path / "cached", key), _losses(tmp_path / "frozen", key), rtol=1e-5, atol=1e-6)
    assert cached["pairs"] == frozen["pairs"] > 0
    # The SFT run's vocabulary, copied into the run so evaluate / convert / a resume read the same one.
    assert (tmp_path / "cached" / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    # Step 1 starts at the reference: every log-ratio is 0, so the loss is log 2.
    assert abs(_losses(tmp_path / "cached")[0] - np.log(2)) < 1e-5

    # A cache made for another data stream is refused, naming what changed.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "cached" / reference_cache.CACHE_DIR, other / reference_cache.CACHE_DIR)
    with pytest.raises(reference_cache.StaleReferenceCacheError, match="another data .*Delete that folder"):
        loop.train(_config(tokenizer_path, **common, seed=1), other)


def test_reward_model_from_an_sft_workdir_trains_and_exports(tmp_path, tokenizer_path, sft_workdir, cache_dir):
    transformers = pytest.importorskip("transformers")
    from flan_jax import convert

    config = _config(tokenizer_path, **PAIRS, **{"objective.name": "reward_model", "checkpoint.init_from": str(sft_workdir),
                                                 "train.num_steps": 3, "objective.margin": 0.1})
    logged = loop.train(config, tmp_path / "rm")
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected", "pairs"} <= set(logged)
    assert np.isfinite(_losses(tmp_path / "rm")).all()
    convert.convert_workdir_to_hf(tmp_path / "rm", tmp_path / "hf")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == 0
