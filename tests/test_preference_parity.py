"""Parity of the preference losses with trl 1.16 on the same tiny HF Llama and the same pairs (float32).

Our side packs several pairs into one row (flan_jax.data.converters.pairs), runs our converted
model and reduces per response (flan_jax.train.pairs); trl's side pads one sequence per response
and runs its own trainer code on the transformers model. Both see identical token ids.
"""

from __future__ import annotations

import copy
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from flan_jax.train import pairs as pairs_lib  # noqa: E402
from flan_jax.train import preference_losses as losses  # noqa: E402
from tests import preference_fakes as fakes  # noqa: E402

PAIRS = fakes.random_pairs(6, seed=3)
BETA = 0.3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    policy_hf, reference_hf = fakes.hf_llama(0), fakes.hf_llama(1)
    cfg, policy = fakes.our_params(policy_hf, tmp / "policy")
    _, reference = fakes.our_params(reference_hf, tmp / "reference")
    batch = {k: jnp.asarray(v) for k, v in fakes.packed_batch(PAIRS, pairs_per_row=3).items()}

    def per_response(params):
        model = fakes.our_model(cfg, params)
        logits = model(batch["input_tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        return pairs_lib.response_log_probs(logits, batch)

    ours_params = {"policy": policy, "reference": reference, "cfg": cfg, "batch": batch}
    valid = np.asarray(pairs_lib.valid_pairs(batch))
    assert valid.sum() == len(PAIRS)
    pick = lambda x: np.asarray(x)[valid]  # noqa: E731  (row-major = pair order)
    ours = types.SimpleNamespace(
        policy=[pick(x) for x in per_response(policy)],
        reference=[pick(x) for x in per_response(reference)],
        lengths=[pick(x) for x in pairs_lib.response_lengths(batch)],
    )
    dataset = datasets.Dataset.from_dict({
        "prompt": [fakes.as_text(p) for p, _, _ in PAIRS],
        "chosen": [" " + fakes.as_text(c) for _, c, _ in PAIRS],
        "rejected": [" " + fakes.as_text(r) for _, _, r in PAIRS],
    })
    return types.SimpleNamespace(
        ours=ours, ours_params=ours_params, policy_hf=policy_hf, reference_hf=reference_hf, tokenizer=fakes.hf_tokenizer(tmp),
        dataset=dataset, tmp=tmp,
    )


def _trl_args(cls, setup, **kwargs):
    return cls(output_dir=str(setup.tmp / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False,
               per_device_train_batch_size=len(PAIRS), **kwargs)


def _dpo_trainer(setup, **kwargs):
    args = _trl_args(trl.DPOConfig, setup, beta=BETA, **kwargs)
    return trl.DPOTrainer(
        model=copy.deepcopy(setup.policy_hf), ref_model=copy.deepcopy(setup.reference_hf), args=args,
        train_dataset=setup.dataset, processing_class=setup.tokenizer,
    )


def _trl_dpo_per_pair(trainer) -> dict[str, np.ndarray]:
    """trl's loss and logged rewards, one pair per batch (so the logged means are per-pair values)."""
    out = {"loss": [], "rewards/chosen": [], "rewards/rejected": []}
    with torch.no_grad():
        for example in fakes.trl_examples(PAIRS):
            loss = trainer._compute_loss(trainer.model, trainer.data_collator([example]), return_outputs=False)
            out["loss"].append(float(loss))
            mode = "train" if trainer.model.training else "eval"
            for key in ("rewards/chosen", "rewards/rejected"):
                out[key].append(trainer._metrics[mode][key][-1])
    return {k: np.asarray(v) for k, v in out.items()}


def _trl_whole_batch_loss(trainer) -> float:
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, trainer.data_collator(fakes.trl_examples(PAIRS)), return_outputs=False))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_losses_and_rewards_equal_trl(setup, loss_type):
    trainer = _dpo_trainer(setup, loss_type=[loss_type])
    expected = _trl_dpo_per_pair(trainer)
    o = setup.ours
    if loss_type == "sigmoid":
        loss, chosen, rejected = losses.dpo(*o.policy, *o.reference, beta=BETA)
    else:
        loss, chosen, rejected = losses.ipo(*o.policy, *o.reference, *o.lengths, beta=BETA)
    np.testing.assert_allclose(np.asarray(loss), expected["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(chosen), expected["rewards/chosen"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rejected), expected["rewards/rejected"], rtol=1e-5, atol=1e-5)
    # A whole padded batch in trl is the mean of our per-pair losses.
    np.testing.assert_allclose(float(np.mean(loss)), _trl_whole_batch_loss(trainer), rtol=1e-5, atol=1e-5)


def test_dpo_with_an_sft_term_equals_trls_sigmoid_plus_sft_loss_per_pair(setup):
    """objective.sft_weight: trl's loss_type=["sigmoid", "sft"] with weights [1, a], one pair per batch
    (trl pools the NLL over the batch's chosen tokens; for one pair that is our per-pair mean)."""
    weight = 0.7
    trainer = _dpo_trainer(setup, loss_type=["sigmoid", "sft"], loss_weights=[1.0, weight])
    expected = _trl_dpo_per_pair(trainer)["loss"]
    o = setup.ours
    loss, _, _ = losses.dpo(*o.policy, *o.reference, beta=BETA)
    np.testing.assert_allclose(np.asarray(loss) - weight * o.policy[0] / o.lengths[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, loss_type", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_the_objectives_batch_loss_and_mean_rewards_equal_trls(setup, name, loss_type):
    """The registered objective itself (its loss_sum / prepare's pair count, frozen reference slot) on
    the packed batch against trl on the padded batch of the same pairs."""
    import jax
    from flax import nnx

    from flan_jax import default_config
    from flan_jax.model import registry
    from flan_jax.train import objectives, partitioning, state as state_lib

    config = default_config.get_config()
    config.objective.update(name=name, beta=BETA, reference="model")
    objective = objectives.get_objective(config)
    p = setup.ours_params
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    parts = state_lib.ModelParts(lambda: registry.build_model(p["cfg"], rngs=nnx.Rngs(0)), mesh,
                                 partitioning.axis_rules(config.mesh))
    ctx = objectives.ObjectiveContext(parts=parts, params=p["policy"], frozen_params={"reference": p["reference"]},
                                      rng=jax.random.key(0))
    prepared = objective.prepare(p["batch"])
    total, metrics = objective.loss_sum(ctx, p["batch"])
    trainer = _dpo_trainer(setup, loss_type=[loss_type])
    expected = _trl_whole_batch_loss(trainer)
    mode = "train" if trainer.model.training else "eval"
    assert float(prepared.denominator) == len(PAIRS)
    np.testing.assert_allclose(float(total / prepared.denominator), expected, rtol=1e-5, atol=1e-5)
    names = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
             "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies"}  # ours: trl's
    for ours_name, trl_name in names.items():
        np.testing.assert_allclose(float(metrics[ours_name] / prepared.denominator), trainer._metrics[mode][trl_name][-1],
                                   rtol=1e-5, atol=1e-5, err_msg=ours_name)


def _cpo_trainer(setup, **kwargs):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = _trl_args(CPOConfig, setup, beta=BETA, max_length=64, **kwargs)
    return CPOTrainer(model=copy.deepcopy(setup.policy_hf), args=args, train_dataset=setup.dataset,
                      processing_class=setup.tokenizer)


def _cpo_batch(examples) -> dict:
    """trl's CPO batch layout (prompt + response per side, labels -100 on the prompt) for the same ids."""
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [e["prompt_ids"] + e[f"{side}_ids"] for e in examples]
        labels = [[-100] * len(e["prompt_ids"]) + e[f"{side}_ids"] for e in examples]
        width = max(map(len, seqs))
        batch[f"{side}_input_ids"] = torch.tensor([s + [fakes.PAD] * (width - len(s)) for s in seqs])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        batch[f"{side}_labels"] = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return batch


def test_simpo_loss_and_rewards_equal_trl(setup):
    gamma = 0.7
    trainer = _cpo_trainer(setup, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=gamma)
    expected = {"loss": [], "rewards/chosen": [], "rewards/rejected": []}
    with torch.no_grad():
        for example in fakes.trl_examples(PAIRS):
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, _cpo_batch([example]))
            expected["loss"].append(float(loss))
            expected["rewards/chosen"].append(metrics["rewards/chosen"])
            expected["rewards/rejected"].append(metrics["rewards/rejected"])
    o = setup.ours
    loss, chosen, rejected = losses.simpo(*o.policy, *o.lengths, beta=BETA, gamma=gamma)
    for ours, key in ((loss, "loss"), (chosen, "rewards/chosen"), (rejected, "rewards/rejected")):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(expected[key]), rtol=1e-5, atol=1e-5, err_msg=key)


def test_conservative_dpo_equals_trls_label_smoothed_sigmoid_on_the_log_ratios(setup):
    """trl 1.16's DPOTrainer dropped cDPO; its label-smoothed sigmoid (CPO's `cpo_loss`) on trl's own
    DPO log-ratios is that loss, so our cDPO is checked against it."""
    smoothing = 0.2
    trainer = _cpo_trainer(setup, loss_type="sigmoid", label_smoothing=smoothing)
    dpo = _dpo_trainer(setup, loss_type=["sigmoid"])
    trl_dpo = _trl_dpo_per_pair(dpo)
    chosen_ratio = torch.tensor(trl_dpo["rewards/chosen"] / BETA)
    rejected_ratio = torch.tensor(trl_dpo["rewards/rejected"] / BETA)
    expected, _, _ = trainer.cpo_loss(chosen_ratio, rejected_ratio)
    o = setup.ours
    loss, _, _ = losses.dpo(*o.policy, *o.reference, beta=BETA, label_smoothing=smoothing)
    np.testing.assert_allclose(np.asarray(loss), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_losses_by_hand():
    pc, pr, rc, rr = jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]), jnp.array([-4.5])
    d = (-3.0 + 4.0) - (-5.0 + 4.5)  # 1.5
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    loss, c, r = losses.dpo(pc, pr, rc, rr, beta=0.5)
    np.testing.assert_allclose(loss, [-np.log(sig(0.75))], rtol=1e-6)
    np.testing.assert_allclose((c, r), ([0.5], [-0.25]), rtol=1e-6)
    loss, _, _ = losses.dpo(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    np.testing.assert_allclose(loss, [-0.9 * np.log(sig(0.75)) - 0.1 * np.log(sig(-0.75))], rtol=1e-6)
    loss, _, _ = losses.ipo(pc, pr, rc, rr, jnp.array([2.0]), jnp.array([4.0]), beta=0.5)
    np.testing.assert_allclose(loss, [(1.0 / 2 - (-0.5) / 4 - 1.0) ** 2], rtol=1e-6)
    loss, c, r = losses.simpo(pc, pr, jnp.array([2.0]), jnp.array([4.0]), beta=2.0, gamma=0.5)
    np.testing.assert_allclose((c, r), ([-3.0], [-2.5]), rtol=1e-6)
    np.testing.assert_allclose(loss, [-np.log(sig(-3.0 + 2.5 - 0.5))], rtol=1e-6)
    loss, _, _ = losses.bradley_terry(jnp.array([1.0]), jnp.array([0.25]), 0.5)
    np.testing.assert_allclose(loss, [-np.log(sig(0.25))], rtol=1e-6)
    assert d == 1.5
