"""GRPO against trl 1.16's GRPOTrainer on the same tiny HF Llama, completions and rewards (float32, 1e-5).

trl's side: its own `_compute_loss` (fused-head log-probs at its temperature, clipped ratio, k3 KL,
loss_type aggregation) and its reference-model log-probs, on prompt / completion ids laid out its
way (prompt and completion tensors with masks). Our side: the converted weights in the RL update
layout (flan_jax/rl/batch.py), the registered "grpo" objective's prepare + loss_sum, our scoring
pass for the reference log-probs and our group advantages. Both see identical token ids.
"""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from flan_jax import default_config  # noqa: E402
from flan_jax.rl import advantages as advantages_lib  # noqa: E402
from flan_jax.rl import batch as batch_lib  # noqa: E402
from flan_jax.rl import logprobs  # noqa: E402
from flan_jax.rl.grpo import GRPO  # noqa: E402
from tests import preference_fakes as fakes  # noqa: E402

GROUP, PROMPTS, PROMPT_LEN, MAX_NEW = 3, 2, 6, 7
TEMPERATURE, KL_COEF, EPSILON = 0.7, 0.04, 0.2


def _rollout(seed: int = 5):
    """Equal-length prompts (trl pads prompts on the left), completions of 1..7 tokens, some without EOS."""
    rng = np.random.default_rng(seed)
    prompts, completions = [], []
    for _ in range(PROMPTS):
        prompt = [fakes.BOS, *rng.integers(4, fakes.VOCAB, PROMPT_LEN - 1).tolist()]
        for _ in range(GROUP):
            prompts.append(prompt)
            if rng.random() < 0.3:  # ran out of tokens: no EOS
                completions.append(rng.integers(4, fakes.VOCAB, MAX_NEW).tolist())
            else:
                completions.append([*rng.integers(4, fakes.VOCAB, int(rng.integers(0, MAX_NEW))).tolist(), fakes.EOS])
    rewards = rng.normal(size=PROMPTS * GROUP).astype(np.float32)
    rewards[3:6] = 1.0  # one group with equal rewards (zero std)
    return prompts, completions, rewards


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl_parity")
    policy_hf, reference_hf = fakes.hf_llama(0), fakes.hf_llama(1)
    policy_hf.save_pretrained(tmp / "policy_hf")
    cfg, policy = fakes.our_params(policy_hf, tmp / "policy")
    _, reference = fakes.our_params(reference_hf, tmp / "reference")
    prompts, completions, rewards = _rollout()
    return types.SimpleNamespace(
        tmp=tmp, reference_hf=reference_hf, cfg=cfg, policy=policy, reference=reference, prompts=prompts,
        completions=completions, rewards=rewards, tokenizer=fakes.hf_tokenizer(tmp),
    )


def _trainer(setup, loss_type: str, kl_ratio_correction: bool = False):
    args = trl.GRPOConfig(
        output_dir=str(setup.tmp / "trl"), report_to=[], use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP, max_completion_length=MAX_NEW,
        temperature=TEMPERATURE, beta=KL_COEF, epsilon=EPSILON, loss_type=loss_type, scale_rewards="group",
        use_bias_correction_kl=kl_ratio_correction,
    )
    dataset = datasets.Dataset.from_dict({"prompt": ["t4 t5"] * (PROMPTS * GROUP)})
    trainer = trl.GRPOTrainer(
        model=str(setup.tmp / "policy_hf"), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args, train_dataset=dataset, processing_class=setup.tokenizer,
    )
    trainer.ref_model.load_state_dict(setup.reference_hf.state_dict())  # our reference, not a copy of the policy
    trainer.model.eval()
    return trainer


def _trl_inputs(setup) -> dict:
    completion_ids = torch.zeros((len(setup.completions), MAX_NEW), dtype=torch.long)
    completion_mask = torch.zeros((len(setup.completions), MAX_NEW), dtype=torch.long)
    for i, c in enumerate(setup.completions):
        completion_ids[i, : len(c)] = torch.tensor(c)
        completion_mask[i, : len(c)] = 1
    prompt_ids = torch.tensor(setup.prompts)
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
            "completion_mask": completion_mask}


def _trl_logps(trainer, model, inputs) -> torch.Tensor:
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(model, ids, mask, MAX_NEW)[0]


def _trl_advantages(rewards: np.ndarray) -> np.ndarray:
    """trl 1.16's group normalisation (GRPOTrainer._generate_and_score_completions), with its nanstd."""
    from trl.trainer.utils import nanstd

    r = torch.tensor(rewards)
    mean = torch.nanmean(r.view(-1, GROUP), dim=1).repeat_interleave(GROUP)
    std = nanstd(r.view(-1, GROUP), dim=1).repeat_interleave(GROUP)
    return torch.nan_to_num((r - mean) / (std + 1e-4), nan=0.0).numpy()


def _our_batch(setup):
    return batch_lib.build_rows(setup.prompts, setup.completions, PROMPT_LEN + MAX_NEW)


def _to_layout(per_completion: np.ndarray, batch) -> np.ndarray:
    """trl's [rows, MAX_NEW] completion-aligned values in our [rows, L] target-aligned layout."""
    out = np.zeros(batch["completion_mask"].shape, np.float32)
    for r, c in enumerate(_our_completions_lengths(batch)):
        out[r, PROMPT_LEN - 1: PROMPT_LEN - 1 + c] = per_completion[r, :c]
    return out


def _our_completions_lengths(batch):
    return batch["completion_mask"].sum(axis=1).astype(int)


def _our_config(loss_type: str, kl_ratio_correction: bool = False):
    config = default_config.get_config()
    config.rl.kl_ratio_correction = kl_ratio_correction
    config.rl.temperature, config.rl.kl_coef, config.rl.epsilon = TEMPERATURE, KL_COEF, EPSILON
    config.rl.loss_type, config.rl.max_new_tokens, config.rl.group_size = loss_type, MAX_NEW, GROUP
    return config


def _our_loss(setup, loss_type: str, batch, kl_ratio_correction: bool = False) -> tuple[float, dict]:
    objective = GRPO(_our_config(loss_type, kl_ratio_correction))
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    prepared = objective.prepare(jbatch)
    ctx = types.SimpleNamespace(model=fakes.our_model(setup.cfg, setup.policy))
    total, sums = objective.loss_sum(ctx, {**jbatch, **prepared.features})
    return float(total / prepared.denominator), {k: float(v / prepared.denominator) for k, v in sums.items()}


def test_group_advantages_equal_trls(setup):
    ours, _ = advantages_lib.group_advantages(jnp.asarray(setup.rewards), GROUP, "group")
    np.testing.assert_allclose(np.asarray(ours), _trl_advantages(setup.rewards), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(ours)[3:6] == 0.0)  # equal rewards: no signal


def test_reference_log_probs_equal_trls_reference_model(setup):
    trainer = _trainer(setup, "grpo")
    inputs = _trl_inputs(setup)
    batch = _our_batch(setup)
    theirs = _to_layout(_trl_logps(trainer, trainer.ref_model, inputs).numpy(), batch)
    ours = logprobs.token_stats(fakes.our_model(setup.cfg, setup.reference), batch, TEMPERATURE)["logps"]
    mask = batch["completion_mask"] > 0
    np.testing.assert_allclose(np.asarray(ours)[mask], theirs[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("old, correction", [("on_policy", False), ("perturbed", False), ("perturbed", True)])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_and_metrics_equal_trls(setup, loss_type, old, correction):
    """trl's use_bias_correction_kl is our rl.kl_ratio_correction (k3 x ratio)."""
    trainer = _trainer(setup, loss_type, correction)
    inputs = _trl_inputs(setup)
    batch = _our_batch(setup)
    mask = batch["completion_mask"]
    ref = _trl_logps(trainer, trainer.ref_model, inputs)
    advantages = _trl_advantages(setup.rewards)
    inputs.update(advantages=torch.tensor(advantages), ref_per_token_logps=ref,
                  num_items_in_batch=inputs["completion_mask"].sum())
    our_policy = logprobs.token_stats(fakes.our_model(setup.cfg, setup.policy), batch, TEMPERATURE)["logps"]
    if old == "on_policy":  # trl: the detached current log-probs; ours: the scoring pass's (ratio 1)
        old_ours = np.asarray(our_policy) * mask
    else:  # the same off-policy log-probs on both sides, far enough to clip
        noise = np.random.default_rng(7).normal(scale=0.5, size=ref.shape).astype(np.float32)
        old_trl = _trl_logps(trainer, trainer.model, inputs) + torch.tensor(noise)
        inputs["old_per_token_logps"] = old_trl
        old_ours = _to_layout(old_trl.numpy(), batch)
    batch.update(old_logps=old_ours, ref_logps=_to_layout(ref.numpy(), batch),
                 advantages=np.asarray(advantages, np.float32)[:, None] * mask)

    with torch.no_grad():
        expected = float(trainer._compute_loss(trainer.model, inputs))
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    loss, metrics = _our_loss(setup, loss_type, batch, correction)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["kl"], logged["kl"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["entropy"], logged["entropy"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["clip_fraction"], logged["clip_ratio/region_mean"], rtol=1e-6, atol=1e-7)
    if old == "perturbed":
        assert logged["clip_ratio/region_mean"] > 0.05  # the clip is really exercised


def test_kl_term_is_zero_when_the_policy_is_the_reference(setup):
    batch = _our_batch(setup)
    mask = batch["completion_mask"]
    logps = np.asarray(logprobs.token_stats(fakes.our_model(setup.cfg, setup.policy), batch, TEMPERATURE)["logps"]) * mask
    batch.update(old_logps=logps, ref_logps=logps, advantages=np.zeros_like(mask))
    loss, metrics = _our_loss(setup, "grpo", batch)
    assert metrics["kl"] == 0.0 and loss == 0.0
    # the same batch against another reference has a positive KL
    other = np.asarray(logprobs.token_stats(fakes.our_model(setup.cfg, setup.reference), batch, TEMPERATURE)["logps"]) * mask
    batch["ref_logps"] = other
    _, metrics = _our_loss(setup, "grpo", batch)
    assert metrics["kl"] > 1e-3


def test_group_size_must_divide_the_rewards():
    with pytest.raises(ValueError, match="groups of 4"):
        advantages_lib.group_advantages(jnp.zeros(6), 4)



@pytest.mark.parametrize("loss_type, old, correction", [("grpo", "on_policy", False), ("dapo", "perturbed", True)])
def test_grpo_gradient_norm_equals_trls(setup, loss_type, old, correction):
    """The gradients, not only the values: the global norm (layout-free) of d loss / d params on both sides."""
    import jax
    from flax import nnx

    from flan_jax import model as fm
    from flan_jax.train import partitioning, state as state_lib

    trainer = _trainer(setup, loss_type, correction)
    inputs = _trl_inputs(setup)
    batch = _our_batch(setup)
    mask = batch["completion_mask"]
    ref = _trl_logps(trainer, trainer.ref_model, inputs)
    advantages = _trl_advantages(setup.rewards)
    inputs.update(advantages=torch.tensor(advantages), ref_per_token_logps=ref,
                  num_items_in_batch=inputs["completion_mask"].sum())
    current = _trl_logps(trainer, trainer.model, inputs)
    if old == "perturbed":
        noise = np.random.default_rng(7).normal(scale=0.5, size=ref.shape).astype(np.float32)
        inputs["old_per_token_logps"] = current + torch.tensor(noise)
    old_ours = _to_layout(inputs.get("old_per_token_logps", current).numpy(), batch)
    batch.update(old_logps=old_ours, ref_logps=_to_layout(ref.numpy(), batch),
                 advantages=np.asarray(advantages, np.float32)[:, None] * mask)
    trainer.model.zero_grad()
    trainer._compute_loss(trainer.model, inputs).backward()
    expected = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trainer.model.parameters() if p.grad is not None)))

    mesh = jax.make_mesh((1, 1, 1), partitioning.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])
    parts = state_lib.ModelParts(lambda: fm.Transformer(setup.cfg, rngs=nnx.Rngs(0)), mesh, partitioning.axis_rules(default_config.get_config().mesh))
    objective = GRPO(_our_config(loss_type, correction))
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    prepared = objective.prepare(jbatch)

    def loss(params):
        ctx = types.SimpleNamespace(model=parts.merge(params))
        return objective.loss_sum(ctx, {**jbatch, **prepared.features})[0] / prepared.denominator

    grads = jax.grad(loss)(setup.policy)
    ours = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads))))
    assert expected > 1e-3
    np.testing.assert_allclose(ours, expected, rtol=1e-4)
