"""The objective seam: SFT through it is bitwise the pre-seam step; objectives' metrics,
micro-batching and frozen slots behave as train/objectives/base.py promises."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flan_jax import model as fm, sharding
from flan_jax.model import registry
from flan_jax.train import loop, losses, objectives, optimizer, partitioning, state as state_lib, step
from tests import train_fakes


def _setup(config, model_fn, heads=()):
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    rules = partitioning.axis_rules(config.mesh)
    parts = state_lib.ModelParts(model_fn, mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, int(config.train.num_steps))
    return mesh, rules, parts, tx, schedule


def _tiny_transformer_config(accum: int):
    config = train_fakes.tiny_config()
    config.optimizer.grad_accum_steps = accum
    cfg = fm.ModelConfig.for_family("llama", vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                    head_dim=8, d_ff=32, max_positions=16)
    return config, cfg


def _pre_seam_step(parts, tx, schedule, config, shardings, mesh, rules):
    """The SFT step as train/step.py computed it before objectives existed (kept verbatim here)."""
    accum = int(config.optimizer.grad_accum_steps)

    def loss_sum(params, batch, weights):
        model = parts.merge(params)
        inputs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], prefix_mask=None)
        hidden, head = model.hidden_states(batch["input_tokens"], **inputs)
        return losses.weighted_head_loss_sum(hidden, head, batch, weights, config.loss)

    grad_fn = jax.value_and_grad(loss_sum)

    def gradients(params, batch, weights):
        if accum == 1:
            return grad_fn(params, batch, weights)
        micro = step._micro_batches({**batch, "__weights": weights}, accum)

        def body(carry, mb):
            mb = {k: sharding.constrain(v, partitioning.BATCH_AXES) for k, v in mb.items()}
            value, grads = grad_fn(params, mb, mb["__weights"])
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return jax.tree.map(jnp.add, carry, (value, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        (value, grads), _ = jax.lax.scan(body, zeros, micro)
        return value, grads

    def run(state, batch):
        with sharding.use_rules(mesh, rules):
            weights, denominator = losses.token_weights(batch, config.loss.normalization)
            total, grads = gradients(state.params, batch, weights)
        loss = total / denominator
        grads = jax.tree.map(lambda g: g / denominator, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & (state.first_nonfinite_step < 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            step=state.step + 1,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(
                (state.first_nonfinite_step < 0) & ~finite, state.step + 1, state.first_nonfinite_step
            ),
        )
        return new_state, (loss, grad_norm, schedule(state.step - state.nonfinite_steps))

    batch_sharding = partitioning.batch_sharding(mesh, rules)
    return jax.jit(run, in_shardings=(shardings, batch_sharding), donate_argnums=(0,))


@pytest.mark.parametrize("accum", [1, 2])
def test_sft_through_the_seam_is_bitwise_the_pre_seam_step(accum):
    config, cfg = _tiny_transformer_config(accum)
    mesh, rules, parts, tx, schedule = _setup(config, lambda: fm.Transformer(cfg, rngs=nnx.Rngs(0)))
    shardings = state_lib.state_shardings(parts, tx, mesh)
    seam = step.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    legacy = _pre_seam_step(parts, tx, schedule, config, shardings, mesh, rules)
    state_a = state_lib.init_state(parts, tx, shardings, 0, mesh)
    state_b = state_lib.init_state(parts, tx, shardings, 0, mesh)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh):
        for seed in range(3):
            batch = partitioning.global_batch(train_fakes.packed_batch(seed, length=16), batch_sharding)
            state_a, metrics = seam(state_a, batch)
            state_b, (loss, grad_norm, _) = legacy(state_b, batch)
            assert np.asarray(metrics["loss"]).tobytes() == np.asarray(loss).tobytes()
            assert np.asarray(metrics["grad_norm"]).tobytes() == np.asarray(grad_norm).tobytes()
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@objectives.register_objective("test_match_reference")
class MatchReference(objectives.Objective):
    """Squared distance of the model's scalar score to the frozen reference's, per token.

    Exercises every part of the contract: a frozen slot, a model head, prepared features and
    batch metrics, and metric sums divided by the denominator.
    """

    features = ("input_tokens", "segment_ids", "positions", "loss_weights")
    frozen_slots = ("reference",)
    model_heads = ("score",)

    def prepare(self, batch):
        weights = batch["loss_weights"].astype(jnp.float32)
        return objectives.Prepared({"w": weights}, jnp.maximum(jnp.sum(weights), 1.0), {"rows": jnp.float32(weights.shape[0])})

    def _score(self, model, batch):
        hidden, _ = model.hidden_states(batch["input_tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        return model.scalar_head("score", hidden)

    def loss_sum(self, ctx, batch):
        score, reference = self._score(ctx.model, batch), self._score(ctx.frozen("reference"), batch)
        noise = jax.random.normal(ctx.rng, score.shape)  # the rng exists and differs per micro-batch
        distance = jnp.square(score + 0.1 - reference) * batch["w"]
        return jnp.sum(distance), {"mean_score": jnp.sum(score * batch["w"]), "noise": jnp.sum(noise * 0)}


def _reference_run(accum: int, steps: int = 3):
    config, cfg = _tiny_transformer_config(accum)
    config.objective.name = "test_match_reference"
    objective = objectives.get_objective(config)
    mesh, rules, parts, tx, schedule = _setup(
        config, lambda: registry.build_model(cfg, rngs=nnx.Rngs(0), heads=objective.model_heads)
    )
    shardings = state_lib.state_shardings(parts, tx, mesh, objective.frozen_slots)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    state = state.replace(frozen={"reference": state_lib.copy_params(state.params)})
    train_step = step.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    history = []
    with jax.set_mesh(mesh):
        for seed in range(steps):
            state, metrics = train_step(state, partitioning.global_batch(train_fakes.packed_batch(seed, length=16), batch_sharding))
            history.append(jax.device_get(metrics))
    return state, history


def test_an_objective_with_a_frozen_reference_head_and_metrics():
    state, history = _reference_run(accum=1)
    first = history[0]
    # Step 0: the model IS the reference, so the loss is the offset alone: 0.1^2 per weighted token.
    np.testing.assert_allclose(first["loss"], 0.01, rtol=1e-5)
    assert first["rows"] == 8.0 and "mean_score" in first and "noise" in first
    assert history[-1]["loss"] < first["loss"]  # trained towards the reference
    # The frozen slot was not trained: it still equals the initial parameters (the step donates
    # the state, so it must have been carried through in its own buffers).
    initial = _reference_run(accum=1, steps=0)[0]
    for a, b in zip(jax.tree.leaves(state.frozen["reference"]), jax.tree.leaves(initial.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert state_lib.fingerprint(state.frozen["reference"]) == state_lib.fingerprint(initial.params)
    assert state_lib.fingerprint(state.params) != state_lib.fingerprint(initial.params)


def test_micro_batches_give_the_full_batch_loss_and_metrics():
    _, whole = _reference_run(accum=1)
    _, split = _reference_run(accum=2)
    for a, b in zip(whole, split):
        for name in ("loss", "mean_score", "grad_norm"):
            np.testing.assert_allclose(a[name], b[name], rtol=2e-5, atol=1e-7)


def test_unknown_objective_and_missing_features_are_named():
    config = train_fakes.tiny_config()
    config.objective.name = "no_such_loss"
    with pytest.raises(ValueError, match="no_such_loss.*sft"):
        objectives.get_objective(config)
    config.objective.name = "test_match_reference"
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    with pytest.raises(KeyError, match=r"lacks \['loss_weights'\].*test_match_reference"):
        step.check_batch({"input_tokens": np.zeros((8, 4)), "segment_ids": np.zeros((8, 4)), "positions": np.zeros((8, 4))}, config, mesh)


def test_unknown_family_and_head_are_refused():
    with pytest.raises(ValueError, match="Unknown model family 'rwkv'"):
        registry.get_family("rwkv")
    assert registry.get_family("gemma") is registry.get_family("llama")
    cfg = fm.ModelConfig.for_family("llama", vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
    with pytest.raises(ValueError, match="unknown head"):
        registry.build_model(cfg, rngs=nnx.Rngs(0), heads=("policy",))
    with pytest.raises(KeyError, match="no 'value' head"):
        fm.Transformer(cfg, rngs=nnx.Rngs(0)).scalar_head("value", jnp.zeros((1, 2, 16)))
    # A head leaves the initialisation of every other parameter unchanged.
    plain = nnx.to_pure_dict(nnx.state(registry.build_model(cfg, rngs=nnx.Rngs(3)), nnx.Param))
    scored = nnx.to_pure_dict(nnx.state(registry.build_model(cfg, rngs=nnx.Rngs(3), heads=("score",)), nnx.Param))
    assert set(scored) - set(plain) == {"scalar_heads"}
    jax.tree.map(np.testing.assert_array_equal, plain, {k: v for k, v in scored.items() if k != "scalar_heads"})


def test_resume_refuses_other_frozen_parameters(tmp_path, tokenizer_path, cache_dir):
    overrides = train_fakes.demo_overrides(tokenizer_path, train__num_steps=2, objective__name="test_match_reference")
    loop.train(train_fakes.demo_config(overrides), tmp_path)
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "mean_score" in records[0]
    # The reference is the initial policy, rebuilt on resume from its source (here the seeded
    # initialisation): a resume whose initialisation differs is refused.
    overrides.update({"train.num_steps": 3, "model.init_std": 0.05, "train.allow_config_change": True})
    with pytest.raises(ValueError, match=r"other frozen parameters \(slots \['reference'\]"):
        loop.train(train_fakes.demo_config(overrides), tmp_path)
    del overrides["model.init_std"]
    loop.train(train_fakes.demo_config(overrides), tmp_path)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
