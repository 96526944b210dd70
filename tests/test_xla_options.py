"""The train step's per-executable XLA options (flan_jax/train/xla_options.py): a bf16 frozen base
under float32 compute on CPU compiles without XLA:CPU's bf16 float normalization, and the step is
then bitwise the same while its scanned layers no longer hold a float32 copy of the base."""

import jax
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

from flan_jax import model as fm
from flan_jax.model import lora, registry
from flan_jax.train import optimizer, partitioning, state as state_lib, step, trainable, xla_options
from tests import t5_fakes, train_fakes

DISABLED = {"xla_disable_hlo_passes": xla_options.CPU_BF16_NORMALIZATION}


def _parts(frozen_dtype="bfloat16", family="llama", lora_rank=4, paths=(r"attn/",), **model):
    """A tiny scanned model's parts: LoRA adapters trained (lora_rank > 0), else the `paths` (none: everything)."""
    sizes = dict(vocab_size=32, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, max_positions=16,
                 scan_layers=True)
    cfg = fm.ModelConfig.for_family(family, **{**sizes, **model})
    config = train_fakes.tiny_config()
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    rules = partitioning.axis_rules(config.mesh)
    lora_cfg = lora.LoRAConfig(rank=lora_rank, alpha=8.0) if lora_rank else None
    spec = trainable.Spec(lora=bool(lora_rank), frozen_dtype=frozen_dtype, paths=() if lora_rank else paths)
    parts = state_lib.ModelParts(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora_cfg), mesh, rules,
                                 trainable=None if spec.trains_everything else spec)
    return config, mesh, rules, parts


def _t5_parts():
    """A tiny T5 (unrolled: its stacks do not scan) with LoRA adapters and the base in bf16."""
    config = train_fakes.tiny_config()
    config.model.family = "t5"
    config.model.update(vocab_size=64, d_model=32, n_layers=1, n_decoder_layers=1, n_heads=4, head_dim=8, d_ff=64,
                        relative_buckets=8, relative_max_distance=16)
    config.data.targets_len = 8
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    rules = partitioning.axis_rules(config.mesh)
    cfg = registry.config_from(config.model)
    spec = trainable.Spec(lora=True, frozen_dtype="bfloat16")
    parts = state_lib.ModelParts(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora.LoRAConfig(rank=4, alpha=8.0)),
                                 mesh, rules, trainable=spec)
    return config, mesh, rules, parts


def _train(config, mesh, rules, parts, options_fn, monkeypatch, steps=2, make_batch=None):
    """Params, metrics and the compiled step's temp bytes after `steps` steps, the step's options from `options_fn`."""
    make_batch = make_batch or (lambda seed: train_fakes.packed_batch(seed, length=16))
    monkeypatch.setattr(xla_options, "train_step_options", options_fn)
    tx, schedule = optimizer.make_optimizer(config.optimizer, int(config.train.num_steps))
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh).replace(frozen={"base": state_lib.init_base(parts, mesh)})
    train_step = step.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)  # calls options_fn
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    batches = [partitioning.global_batch(make_batch(seed), batch_sharding) for seed in range(steps)]
    with jax.set_mesh(mesh):
        compiled = train_step.lower(state, batches[0]).compile()  # with the jit's compiler options
        temp = compiled.memory_analysis().temp_size_in_bytes
        history = []
        for batch in batches:
            state, metrics = compiled(state, batch)
            history.append({k: np.asarray(v) for k, v in metrics.items()})
    return jax.tree.map(np.asarray, state.params), history, temp


def test_only_a_bf16_base_under_float32_compute_on_cpu_gets_the_option():
    _, _, _, bf16_base = _parts("bfloat16")
    _, _, _, f32_base = _parts("")
    _, _, _, everything = _parts("", lora_rank=0, paths=())
    assert xla_options.train_step_options(bf16_base, "float32", "cpu") == DISABLED
    assert xla_options.train_step_options(bf16_base, "bfloat16", "cpu") == {}  # bf16 arithmetic: the pass matters
    assert xla_options.train_step_options(bf16_base, "float32", "gpu") == {}
    assert xla_options.train_step_options(f32_base, "float32", "cpu") == {}
    assert not everything.has_base and xla_options.train_step_options(everything, "float32", "cpu") == {}


@pytest.mark.parametrize("family, lora_rank", [("llama", 4), ("gemma", 4), ("llama", 0)])
def test_the_step_is_bitwise_the_same_and_holds_no_float32_copy_of_the_base(family, lora_rank, monkeypatch):
    config, mesh, rules, parts = _parts("bfloat16", family=family, lora_rank=lora_rank)
    assert xla_options.train_step_options(parts, config.model.dtype, "cpu") == DISABLED
    with_pass = _train(config, mesh, rules, parts, lambda *a: {}, monkeypatch)
    without = _train(config, mesh, rules, parts, lambda *a: DISABLED, monkeypatch)
    _assert_bitwise_equal(without, with_pass)
    # What the pass costs: a float32 copy of every stacked frozen kernel, for the whole step.
    stacked = traversals.flatten_mapping(parts.base_abstract["layers"])
    kernels_f32_bytes = sum(4 * int(np.prod(x.shape)) for path, x in stacked.items() if path[-1] == "kernel")
    assert with_pass[2] - without[2] >= kernels_f32_bytes > 0


def _assert_bitwise_equal(ours, reference):
    for a, b in zip(jax.tree.leaves(ours[0]), jax.tree.leaves(reference[0])):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(ours[1], reference[1]):
        assert {k: v.tobytes() for k, v in a.items()} == {k: v.tobytes() for k, v in b.items()}


def test_a_t5_lora_step_with_a_bf16_base_is_bitwise_the_same(monkeypatch):
    config, mesh, rules, parts = _t5_parts()
    assert xla_options.train_step_options(parts, config.model.dtype, "cpu") == DISABLED
    batch = lambda seed: t5_fakes.random_packed_batch(seed, enc_len=16, dec_len=8)  # noqa: E731
    reference = _train(config, mesh, rules, parts, lambda *a: {}, monkeypatch, make_batch=batch)
    ours = _train(config, mesh, rules, parts, lambda *a: DISABLED, monkeypatch, make_batch=batch)
    _assert_bitwise_equal(ours, reference)
