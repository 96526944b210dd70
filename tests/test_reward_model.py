"""The reward model: scores equal transformers' *ForSequenceClassification (import and export), the
Bradley-Terry loss equals trl's RewardTrainer on the same tiny Llama and pairs (float32)."""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flan_jax import convert  # noqa: E402
from flan_jax import model as fm  # noqa: E402
from flan_jax.convert import checkpoint  # noqa: E402
from flan_jax.train import pairs as pairs_lib  # noqa: E402
from flan_jax.train import preference_losses  # noqa: E402
from flan_jax.train.objectives import reward  # noqa: E402
from tests import preference_fakes as fakes  # noqa: E402

PAIRS = fakes.random_pairs(6, seed=11)


def _reward_model(cfg, flat):
    model = nnx.eval_shape(lambda: fm.Transformer(cfg, rngs=nnx.Rngs(0), heads=("score",)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpoint.nest({p: jnp.asarray(v) for p, v in flat.items()}))
    nnx.update(model, state)
    return model


def _our_scores(model) -> tuple[np.ndarray, np.ndarray]:
    batch = {k: jnp.asarray(v) for k, v in fakes.packed_batch(PAIRS, pairs_per_row=3).items()}
    scores = reward.response_scores(model, batch, dict(positions=batch["positions"], segment_ids=batch["segment_ids"]))
    valid = np.asarray(pairs_lib.valid_pairs(batch))
    return np.asarray(scores.chosen)[valid], np.asarray(scores.rejected)[valid]


def _hf_inputs() -> dict:
    """Chosen rows then rejected rows, right-padded: [BOS] prompt response (what trl's reward collator gives)."""
    seqs = [[fakes.BOS, *p, *c] for p, c, _ in PAIRS] + [[fakes.BOS, *p, *r] for p, _, r in PAIRS]
    width = max(map(len, seqs))
    return {
        "input_ids": torch.tensor([s + [fakes.PAD] * (width - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
    }


def _hf_scores(hf_model) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits = hf_model(**_hf_inputs()).logits[:, 0].numpy()
    return logits[: len(PAIRS)], logits[len(PAIRS):]


@pytest.fixture(scope="module")
def hf_reward(tmp_path_factory):
    model = fakes.hf_llama(4, kind="reward")
    path = tmp_path_factory.mktemp("hf_reward")
    model.save_pretrained(path)
    return model, path


def test_import_scores_equal_transformers(hf_reward):
    hf_model, path = hf_reward
    cfg, flat = convert.load_hf_reward_model(path)
    ours = _our_scores(_reward_model(cfg.replace(attention="reference"), flat))
    for a, b in zip(ours, _hf_scores(hf_model)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # the scores are not trivially equal


def test_export_loads_in_transformers_with_equal_scores_and_round_trips_bitwise(hf_reward, tmp_path):
    cfg, _ = convert.load_hf_reward_model(hf_reward[1])
    cfg = cfg.replace(init_std=0.15, attention="reference")
    model = fm.Transformer(cfg, rngs=nnx.Rngs(7), heads=("score",))  # our own random weights
    convert.write_hf_reward_model(tmp_path, cfg, nnx.state(model, nnx.Param))
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(loaded).__name__ == "LlamaForSequenceClassification" and loaded.config.num_labels == 1
    for a, b in zip(_our_scores(model), _hf_scores(loaded.eval())):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    _, back = convert.load_hf_reward_model(tmp_path)
    original = checkpoint.flatten(nnx.state(model, nnx.Param))
    for path, value in original.items():
        if path != ("lm_head",):  # a classification checkpoint has no LM head
            assert np.array_equal(back[path], np.asarray(value)), path


def test_import_refuses_a_causal_lm_folder(tmp_path):
    fakes.hf_llama(0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="ForSequenceClassification with num_labels=1"):
        convert.load_hf_reward_model(tmp_path)


@pytest.mark.parametrize("margin", [0.0, 0.4])
def test_bradley_terry_loss_equals_trl_reward_trainer(hf_reward, tmp_path, margin):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    hf_model, path = hf_reward
    texts = {"chosen": [fakes.as_text(c) for _, c, _ in PAIRS], "rejected": [fakes.as_text(r) for _, _, r in PAIRS]}
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False)
    trainer = trl.RewardTrainer(model=copy.deepcopy(hf_model), args=args, train_dataset=datasets.Dataset.from_dict(texts),
                                processing_class=fakes.hf_tokenizer(tmp_path))
    inputs = _hf_inputs()
    if margin:
        inputs["margin"] = torch.full((len(PAIRS),), margin)
    with torch.no_grad():
        expected = float(trainer.compute_loss(trainer.model, inputs))
    cfg, flat = convert.load_hf_reward_model(path)
    chosen, rejected = _our_scores(_reward_model(cfg.replace(attention="reference"), flat))
    loss, _, _ = preference_losses.bradley_terry(jnp.asarray(chosen), jnp.asarray(rejected), margin)
    np.testing.assert_allclose(float(jnp.mean(loss)), expected, rtol=1e-5, atol=1e-5)
