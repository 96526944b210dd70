"""The training loop on the demo config (tiny sizes): outputs, resume, SIGTERM, non-finite handling, CLI."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from flan_jax.train import checkpointing, loop, partitioning, state as state_lib
from tests import train_fakes

REQUIRED_FIELDS = {"step", "loss", "learning_rate", "tokens_per_sec", "grad_norm", "mfu", "skipped_steps"}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(cache_dir):
    """Every train() call of this module uses the module's compilation cache."""
    return cache_dir


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_demo_run_writes_metrics_checkpoints_eval_and_resumes(tmp_path, tokenizer_path):
    demo = train_fakes.demo_config({})
    overrides = train_fakes.demo_overrides(tokenizer_path, train__num_steps=3, eval__mixtures=demo.eval.mixtures)
    loop.train(train_fakes.demo_config(overrides), tmp_path)

    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(REQUIRED_FIELDS <= set(r) for r in records)
    assert all(np.isfinite(r["loss"]) and r["learning_rate"] >= 0 for r in records)
    assert records[0]["tokens_per_sec"] is None and records[1]["tokens_per_sec"] > 0
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    results = json.loads((tmp_path / "eval" / "step_3.json").read_text())
    assert "overall" in results and (tmp_path / "eval" / "step_0.json").exists()  # demo: eval at start and end

    model, config, step = checkpointing.load_model(tmp_path)
    assert step == 3 and config.train.num_steps == 3
    logits = model(np.ones((1, 4), np.int32))
    assert logits.shape == (1, 4, config.model.vocab_size)

    # Same workdir, more steps: resumes at 3, logs 4 and 5 only, no evaluation at start again.
    # num_steps sets the schedule's length, so extending the run is a config change to allow.
    overrides.update({"train.num_steps": 5, "eval.mixtures": (), "train.allow_config_change": True})
    loop.train(train_fakes.demo_config(overrides), tmp_path)
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert _metrics(tmp_path)[:3] == records
    assert _metrics(tmp_path)[3]["config_changes"] == {"train.num_steps": [3, 5]}


def _poison(monkeypatch, at_call: int, *, sigterm: bool = False):
    """Makes the `at_call`-th batch non-finite (NaN loss weights) or sends SIGTERM while it trains."""
    original = partitioning.global_batch
    calls = {"n": 0}

    def patched(batch, sharding):
        calls["n"] += 1
        if calls["n"] == at_call:
            if sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                batch = {**batch, "loss_weights": np.full_like(batch["loss_weights"], np.nan)}
        return original(batch, sharding)

    monkeypatch.setattr(partitioning, "global_batch", patched)


def test_nonfinite_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer_path, monkeypatch):
    overrides = train_fakes.demo_overrides(tokenizer_path, train__num_steps=5, train__log_every=2, checkpoint__every_steps=2)
    _poison(monkeypatch, at_call=3)
    with pytest.raises(loop.NonFiniteError, match="at step 3.*last good checkpoint is step 2"):
        loop.train(train_fakes.demo_config(overrides), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert [r["step"] for r in _metrics(tmp_path)] == [2]


def test_nonfinite_skip_skips_the_update_and_counts_it(tmp_path, tokenizer_path, monkeypatch):
    overrides = train_fakes.demo_overrides(
        tokenizer_path, train__num_steps=4, train__on_nonfinite="skip", checkpoint__every_steps=100
    )
    _poison(monkeypatch, at_call=3)
    loop.train(train_fakes.demo_config(overrides), tmp_path)
    records = _metrics(tmp_path)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
    # The non-finite values are JSON null (strict parsers reject a bare NaN); the step is counted.
    assert records[2]["loss"] is None and np.isfinite(records[3]["loss"])
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    # The skipped update did not advance the optimizer: step 4 used the rate step 3 would have.
    assert records[3]["learning_rate"] == records[2]["learning_rate"] != records[1]["learning_rate"]
    _, _, step = checkpointing.load_model(tmp_path)
    assert step == 4


def test_sigterm_saves_a_checkpoint_and_returns(tmp_path, tokenizer_path, monkeypatch):
    overrides = train_fakes.demo_overrides(tokenizer_path, train__num_steps=4, checkpoint__every_steps=100)
    _poison(monkeypatch, at_call=2, sigterm=True)
    loop.train(train_fakes.demo_config(overrides), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_cli_rejects_a_misspelt_override_at_once(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flan_jax.train", "--config=configs/demo.py", f"--workdir={tmp_path}", "--config.train.num_stepz=5"],
        cwd=train_fakes.ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "unknown config field" in result.stderr and 'Did you mean "num_steps"' in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "config.json").exists()


def test_rows_longer_than_a_learned_position_table_fail_before_training(tmp_path, tokenizer_path):
    overrides = train_fakes.demo_overrides(tokenizer_path, model__family="gpt2", model__max_positions=16)
    with pytest.raises(ValueError, match=r"seq_len=\d+ exceeds the model's learned position table"):
        loop.train(train_fakes.demo_config(overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_init_from_converted_weights_starts_from_them(tmp_path, tokenizer_path):
    from flax import nnx

    from flan_jax import convert, model as fm

    config = train_fakes.demo_config(train_fakes.demo_overrides(tokenizer_path, train__num_steps=1))
    cfg = fm.ModelConfig.from_config(config.model)
    source = nnx.to_pure_dict(nnx.state(fm.Transformer(cfg, rngs=nnx.Rngs(7)), nnx.Param))
    convert.save_converted(tmp_path / "converted", cfg, source)
    config.checkpoint.init_from = str(tmp_path / "converted")
    loop.train(config, tmp_path / "run")
    # The one step ran at learning rate 0 (warmup starts at 0), so the params are the converted ones.
    model, _, _ = checkpointing.load_model(tmp_path / "run")
    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, trained, source)

    config.model.d_ff = 48  # a different architecture is refused with the differing field
    with pytest.raises(ValueError, match="d_ff"):
        loop.train(config, tmp_path / "other")


def test_flops_per_token_follows_the_documented_formula():
    from flax import nnx

    from flan_jax import model as fm
    from flan_jax.train import metrics

    config = train_fakes.demo_config({})
    cfg = fm.ModelConfig.from_config(config.model)
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    parts = state_lib.ModelParts(lambda: fm.Transformer(cfg, rngs=nnx.Rngs(0)), mesh, partitioning.axis_rules(config.mesh))
    n = metrics.matmul_param_count(parts.abstract_params, parts.logical_axes, tied_embeddings=cfg.tie_embeddings)
    d, h, kv, hd, ff, v, layers = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    # Llama: q, k, v, o projections + gated MLP (3 matrices) per layer, + the untied output head.
    by_hand = layers * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * ff) + d * v
    assert n == by_hand
    assert metrics.flops_per_token(cfg, n, 256) == 6 * by_hand + 12 * layers * h * hd * 256


def test_cpu_peak_is_measured_in_the_compute_dtype(monkeypatch):
    from flan_jax.train import metrics

    assert metrics.peak_flops(-1.0, "bfloat16") is None  # -1 turns MFU off
    assert metrics.peak_flops(5e12, "bfloat16") == 5e12 * len(jax.devices())
    measured = []
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda dtype: measured.append(dtype) or 1.0)
    assert metrics.peak_flops(0.0, "bfloat16") == 1.0 and measured == ["bfloat16"]
    monkeypatch.undo()
    for dtype in ("float32", "bfloat16"):
        assert metrics.measure_matmul_flops(size=128, repeats=1, dtype=dtype) > 0


def test_truncate_jsonl_drops_later_steps_and_a_torn_last_line(tmp_path):
    from flan_jax.train import metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.5}\n{"step": 2, "loss": 1.25}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    metrics.truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 1.5}\n{"step": 2, "loss": 1.25}\n'


def test_periodic_evaluation_keeps_the_best_checkpoint(tmp_path, tokenizer_path, monkeypatch):
    from flan_jax.eval import evaluator

    scores = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3}
    seen = []

    def fake_evaluate(model, tokenizer, config, *, workdir, step):
        seen.append(step)
        return {"summary": {"overall/exact_match": scores[step]}}

    monkeypatch.setattr(evaluator, "evaluate", fake_evaluate)
    overrides = train_fakes.demo_overrides(
        tokenizer_path,
        eval__mixtures=("synthetic_eval_heldout_cluster",),
        eval__every_steps=1,
        eval__at_start=False,
        checkpoint__every_steps=100,
        checkpoint__keep=1,
        checkpoint__keep_best_metric="overall/exact_match",
    )
    loop.train(train_fakes.demo_config(overrides), tmp_path)
    assert seen == [1, 2, 3, 4]  # every step, evaluated once (also the last one)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def test_bad_loop_settings_fail_before_any_work(tmp_path):
    config = train_fakes.demo_config(train_fakes.demo_overrides("", train__log_every=0))
    with pytest.raises(ValueError, match="train.log_every"):
        loop.train(config, tmp_path)
    assert not (tmp_path / "config.json").exists()
