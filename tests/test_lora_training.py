"""LoRA runs end to end: a converted base + adapters trained by the trainer, checkpoints holding
only the adapters, evaluation and generation without merging, PEFT / merged HF exports with the
same logits, importing the adapter back, refusal of another base, and SIGKILL-and-resume bitwise.

The runs use scanned layers (`model.scan_layers`, the layout of pod-scale runs, whose adapters are
stacked like their kernels), so the resume and export checks cover that layout; unrolled LoRA
training runs end to end in test_lora_dpo.py and test_t5_lora.py, and test_scan_lora.py checks
that both layouts hold the same adapters."""

from __future__ import annotations

import json
import random
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

from flan_jax import convert, model as fm
from flan_jax.convert import __main__ as convert_cli
from flan_jax.model import layout, lora
from flan_jax.train import checkpointing, loop, partitioning
from tests import test_resume, train_fakes

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "trainable.frozen_dtype": "bfloat16",
        "model.scan_layers": True}
STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(cache_dir):
    yield cache_dir


def _converted_base(path, seed):
    config = train_fakes.demo_config(train_fakes.demo_overrides(""))
    cfg = fm.ModelConfig.from_config(config.model)
    params = nnx.to_pure_dict(nnx.state(fm.Transformer(cfg.replace(init_std=0.1), rngs=nnx.Rngs(seed)), nnx.Param))
    convert.save_converted(path, cfg, params)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return _converted_base(root / "base", 7), _converted_base(root / "other_base", 8)


def _overrides(tokenizer_path, base, **extra):
    values = train_fakes.demo_overrides(tokenizer_path, checkpoint__init_from=str(base), **extra)
    values.update(LORA)
    return values


def _run_overrides(tokenizer_path, base):
    return _overrides(tokenizer_path, base, train__num_steps=STEPS, checkpoint__every_steps=3, checkpoint__keep=2)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer_path, bases):
    """A LoRA run of STEPS steps on the converted base; also the uninterrupted reference of the resume test."""
    workdir = tmp_path_factory.mktemp("lora_run")
    loop.train(train_fakes.demo_config(_run_overrides(tokenizer_path, bases[0])), workdir)
    return workdir


def _saved_arrays(item_dir) -> list[tuple[str, ...]]:
    """The key paths of the arrays Orbax saved in one checkpoint item (from its _METADATA)."""
    tree = json.loads((item_dir / "_METADATA").read_text())["tree_metadata"]
    return [tuple(k["key"] for k in v["key_metadata"]) for v in tree.values() if v["value_metadata"]["value_type"] == "jax.Array"]


def _array_bytes(item_dir) -> int:
    """Bytes of the arrays saved in one Orbax checkpoint item, from their shapes and dtypes."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(item_dir).item_metadata.tree
    return sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in jax.tree.leaves(tree))


def test_checkpoints_hold_only_the_adapters_and_their_optimizer_state(lora_run, bases):
    directory = lora_run / "checkpoints" / str(STEPS)
    params = _saved_arrays(directory / "params")
    assert params and all(p[-1] in ("lora_a", "lora_b") for p in params)
    assert {p[-2] for p in params} == {"q", "k", "v", "o", "gate", "up", "down"}
    moments = [p for p in _saved_arrays(directory / "opt_state") if p[-1] != "count"]
    assert moments and all(p[-1] in ("lora_a", "lora_b") for p in moments)  # Adam's mu and nu of adapters only
    assert len(moments) == 2 * len(params)
    # The base is referenced (config.checkpoint.init_from) and fingerprinted, not copied.
    ckpt_config = train_fakes.demo_config({}).checkpoint
    assert set(checkpointing.Checkpointer(lora_run, ckpt_config, read_only=True).frozen_fingerprints(STEPS)) == {"base"}
    # The saved arrays are a small part of the base's (bytes from Orbax's metadata: the files' sizes
    # are not a measure at this size, as OCDBT splits its data files differently from save to save).
    saved = _array_bytes(directory / "params")
    base = sum(np.asarray(x).nbytes for x in jax.tree.leaves(convert.load_converted(bases[0])[1]))
    assert 0 < saved < base / 3


def _ids(seed=0):
    return np.random.default_rng(seed).integers(1, 400, (2, 12)).astype(np.int32)


def test_evaluation_and_exports_of_a_lora_run(lora_run, bases, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft_lib = pytest.importorskip("peft")

    model, config, step = checkpointing.load_model(lora_run)
    assert step == STEPS and lora.adapters(model)  # unmerged: base + adapters
    q = model.layers.attn.q  # the stacked (scanned) layers' q projection
    assert q.kernel.dtype == jnp.bfloat16 and q.lora_a.dtype == jnp.float32
    assert q.lora_a.shape[0] == config.model.n_layers  # adapters stacked like their kernel
    assert np.all(np.any(np.asarray(q.lora_b[...]) != 0, axis=(1, 2, 3)))  # every layer's adapter trained
    from flan_jax.model.generate import generate

    assert len(generate(model, [[2, 5, 9]], max_new_tokens=3, eos_id=3, pad_id=0)) == 1
    ids = _ids()
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))

    assert convert_cli.main([f"--to_peft={tmp_path / 'adapter'}", f"--workdir={lora_run}"]) == 0
    assert convert_cli.main([f"--to_hf={tmp_path / 'hf_base'}", f"--checkpoint={bases[0]}"]) == 0
    assert convert_cli.main([f"--to_hf={tmp_path / 'merged'}", f"--workdir={lora_run}"]) == 0

    def hf(model_or_path, dtype=None):
        m = model_or_path
        if not isinstance(m, torch.nn.Module):
            m = transformers.AutoModelForCausalLM.from_pretrained(m, attn_implementation="eager").eval()
        if dtype is not None:
            m = m.to(dtype)
        with torch.no_grad():
            return m(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()

    # The run's base is held in bf16: the HF base gets those very values (exported in float32).
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base", attn_implementation="eager").eval()
    with torch.no_grad():
        for p in base_hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    with_adapter = peft_lib.PeftModel.from_pretrained(base_hf, tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf(with_adapter), ours, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(hf(tmp_path / "merged"), ours, atol=1e-4, rtol=1e-4)
    provenance = json.loads((tmp_path / "adapter" / "flan_jax_adapter.json").read_text())
    assert provenance["step"] == STEPS and provenance["base"] == str(bases[0])

    # Back: the exported adapter checks against its base, merges, and starts a new LoRA run.
    merged_dir = tmp_path / "from_peft_merged"
    assert convert_cli.main([f"--from_peft={tmp_path / 'adapter'}", f"--checkpoint={bases[0]}", f"--out={merged_dir}"]) == 0
    _, merged = convert.load_converted(merged_dir)
    _, base_params = convert.load_converted(bases[0])  # float32: the merge uses the stored base, not bf16
    # The run's (stacked) adapters unrolled to the converted base's per-layer paths.
    adapted = traversals.flatten_mapping(layout.unstack(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    adapted.update(traversals.flatten_mapping(nnx.to_pure_dict(base_params)))
    expected = traversals.flatten_mapping(
        lora.merged_params(traversals.unflatten_mapping(adapted), lora.scales_of(model, per_layer=True)))
    for path, value in traversals.flatten_mapping(nnx.to_pure_dict(merged)).items():
        np.testing.assert_array_equal(np.asarray(value), expected[path], err_msg=str(path))
    config.lora.init_from = str(tmp_path / "adapter")
    mesh = partitioning.make_mesh(config.mesh)
    cfg, parts = loop.build_model(config, mesh, partitioning.axis_rules(config.mesh))
    initial = traversals.flatten_mapping(loop.initial_params(config, parts, mesh, cfg))
    trained = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for path in (p for p in initial if lora.is_adapter_path(p)):
        np.testing.assert_array_equal(np.asarray(initial[path]), np.asarray(trained[path]), err_msg=str(path))

    # An adapter for another base is refused, naming the tensor.
    wide = tmp_path / "wide_base"
    cfg_wide = fm.ModelConfig.from_config(config.model).replace(d_ff=96)
    convert.save_converted(wide, cfg_wide, nnx.to_pure_dict(nnx.state(fm.Transformer(cfg_wide, rngs=nnx.Rngs(0)), nnx.Param)))
    assert convert_cli.main([f"--from_peft={tmp_path / 'adapter'}", f"--checkpoint={wide}"]) == 2
    assert "tensor base_model.model.model.layers.0.mlp.down_proj.lora_A.weight has shape (4, 64), this base needs (4, 96)" \
        in capsys.readouterr().err


def test_resuming_with_another_base_is_refused(lora_run, bases, tokenizer_path, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(lora_run, workdir)
    # A longer run is allowed as a config change; the other base is what must be refused.
    config = train_fakes.demo_config(_overrides(tokenizer_path, bases[1], train__num_steps=STEPS + 3,
                                                train__allow_config_change=True))
    with pytest.raises(ValueError, match=r"other frozen parameters \(slots \['base'\].*checkpoint.init_from"):
        loop.train(config, workdir)
    # load_model (evaluation, export) checks the rebuilt base too: the base folder replaced in place.
    aside = tmp_path / "aside"
    shutil.move(bases[0], aside)
    try:
        shutil.copytree(bases[1], bases[0])
        with pytest.raises(ValueError, match=r"holds only the trained parameters.*not the base it was trained on"):
            checkpointing.load_model(lora_run, STEPS)
    finally:
        shutil.rmtree(bases[0], ignore_errors=True)
        shutil.move(aside, bases[0])


def _command(workdir, tokenizer_path, base):
    overrides = _run_overrides(tokenizer_path, base)
    return [sys.executable, "-m", "flan_jax.train", "--config=configs/demo.py", f"--workdir={workdir}"] + train_fakes.cli_args(overrides)


def test_sigkill_and_restart_of_a_lora_run_is_bitwise_identical(tmp_path, tokenizer_path, bases, cache_dir, lora_run):
    """Killed at a random moment and restarted with the same command, the run equals `lora_run`."""
    env = train_fakes.subprocess_env(cache_dir)
    reference, resumed = lora_run, tmp_path / "resumed"
    rng = random.Random(16)
    for _ in range(3):
        if test_resume._kill_at_random_moment(_command(resumed, tokenizer_path, bases[0]), env, resumed, rng):
            break
        shutil.rmtree(resumed)
    else:
        pytest.fail("the run always finished before SIGKILL landed")
    assert test_resume._lines(resumed) < STEPS
    test_resume._run(_command(resumed, tokenizer_path, bases[0]), env)
    ref, res = test_resume._records(reference), test_resume._records(resumed)
    assert [r["step"] for r in res] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [r[key] for r in res] == [r[key] for r in ref], key
    a, _, _ = checkpointing.load_model(reference)
    b, _, _ = checkpointing.load_model(resumed)
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        assert x.tobytes() == y.tobytes()


def jax_leaves(model):
    return [np.asarray(v) for v in traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param))).values()]
