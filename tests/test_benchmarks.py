"""The benchmark scripts run end to end (their tiny presets) and report every row.

Marked slow: they check the measuring tools, not the library (whose train step, data pipeline and
T5 decoding the default suite tests directly), and cost minutes of child processes and torch runs.
"""

import json
import subprocess
import sys

import pytest

from flan_jax import host_memory
from tests import train_fakes

pytestmark = pytest.mark.slow


def test_train_throughput_tiny_reports_every_variant_and_peer(tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--tiny", "--devices=2", "--grad_accum=2", f"--json={out}"],
        cwd=train_fakes.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["name"], r["variant"], r["devices"]): r for r in report["rows"]}
    assert set(rows) == {
        ("flan_jax train step", "fp32", 1),
        ("flan_jax train step", "fp32", 2),
        ("flan_jax train step", "bf16", 1),
        ("flan_jax train step", "bf16", 2),
        ("transformers + torch AdamW", "fp32", 1),
        ("transformers + torch AdamW", "bf16", 1),
    }
    for row in rows.values():
        assert row["tokens_per_sec"] > 0 and row["final_loss"] > 0
        assert row["grad_accum"] == 2  # both sides ran every step as two micro-batches
    assert report["ceiling"]["float32"] > 0 and report["ceiling"]["bfloat16"] > 0
    assert "| transformers + torch AdamW | bf16 autocast / fp32 params | 1 |" in result.stdout
    # flan_jax rows as its launchers run (all the malloc tunables, on Linux); torch rows in a child
    # with the reuse tunables but without huge pages.
    for (name, _, _), row in rows.items() if sys.platform.startswith("linux") else ():
        tunables = row["glibc_tunables"].split(":")
        assert all(t in tunables for t in host_memory.REUSE_TUNABLES)
        assert (host_memory.HUGE_PAGES in tunables) == (not name.startswith("transformers"))


def test_data_pipeline_runs_against_the_measured_train_step():
    """benchmarks/data_pipeline.py end to end on the built-in mixture, trainer speed measured in the run."""
    result = subprocess.run(
        [sys.executable, "benchmarks/data_pipeline.py", "--mixture=synthetic_train", "--num_examples=400",
         "--tokenizer_examples=300", "--vocab_size=512", "--seq_lens=256", "--fill_bins=16"],
        cwd=train_fakes.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| render + loader (end to end) |" in result.stdout
    assert "(the demo model's train step, measured in this run)" in result.stdout


def test_t5_benchmark_tiny_trains_and_decodes_both_sides_on_the_same_weights(tmp_path):
    """benchmarks/t5.py end to end (--tiny): same first loss on both sides, identical greedy tokens."""
    out = tmp_path / "t5.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/t5.py", "--tiny", f"--json={out}"],
        cwd=train_fakes.ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    ours, theirs = report["train"]
    assert ours["name"] == "flan_jax train step" and theirs["name"] == "transformers + torch AdamW"
    assert abs(ours["first_loss"] - theirs["first_loss"]) < 1e-4 * theirs["first_loss"]
    assert ours["tokens_per_sec"] > 0 and theirs["tokens_per_sec"] > 0 and ours["mfu_of_cpu_matmul_peak"] > 0
    assert report["decode"]["greedy_token_agreement"] == 1.0
    assert "train float32: flan_jax / transformers =" in result.stdout


def test_lora_memory_tiny_measures_every_row_under_both_malloc_settings(tmp_path):
    """benchmarks/lora_memory.py end to end (--tiny): each run of each side under glibc's default
    malloc and under the reuse tunables, the same parameter counts on both sides."""
    out = tmp_path / "lora.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/lora_memory.py", "--tiny", f"--json={out}"],
        cwd=train_fakes.ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r["malloc"], r["run"]): r for r in json.loads(out.read_text())["rows"]}
    runs = ("flan_jax full", "flan_jax LoRA", "torch full", "PEFT LoRA")
    assert set(rows) == {(malloc, run) for malloc in ("default", "reuse") for run in runs}
    for (malloc, _), row in rows.items():
        assert row["step_seconds"] > 0 and row["peak_rss_bytes"] > 0
        tunables = row["glibc_tunables"].split(":") if row["glibc_tunables"] else []
        assert all((t in tunables) == (malloc == "reuse") for t in host_memory.REUSE_TUNABLES)
        assert host_memory.HUGE_PAGES not in tunables
    for malloc in ("default", "reuse"):
        ours, theirs = rows[(malloc, "flan_jax LoRA")], rows[(malloc, "PEFT LoRA")]
        assert ours["trainable_params"] == theirs["trainable_params"] < rows[(malloc, "flan_jax full")]["trainable_params"]
        assert rows[(malloc, "flan_jax full")]["trainable_params"] == rows[(malloc, "torch full")]["trainable_params"]
    assert "| tiny | default | flan_jax LoRA |" in result.stdout and "| tiny | reuse | PEFT LoRA |" in result.stdout


def test_lora_memory_keeps_the_other_rows_when_one_child_fails(tmp_path):
    """A row whose child fails (here: a rank larger than the tiny model's dimensions) is named in
    the exit status and the JSON, and the rows before and after it are still measured and kept (a
    GPU lease stopped by one bad row keeps the others' numbers)."""
    out = tmp_path / "lora.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/lora_memory.py", "--tiny", "--malloc=default", "--rank=1000",
         "--runs=flan_jax LoRA,flan_jax full", f"--json={out}"],
        cwd=train_fakes.ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode != 0
    assert "1 of 2 rows failed: tiny flan_jax LoRA: child exited with status" in result.stderr
    rows = {r["run"]: r for r in json.loads(out.read_text())["rows"]}
    assert "error" in rows["flan_jax LoRA"] and "step_seconds" not in rows["flan_jax LoRA"]
    assert rows["flan_jax full"]["step_seconds"] > 0
    assert "| tiny | default | flan_jax full |" in result.stdout and "| tiny | default | flan_jax LoRA |" not in result.stdout


def test_lora_projection_tiny_times_every_variant_of_every_projection(tmp_path):
    """benchmarks/lora_projection.py end to end (--tiny): the seven projection shapes, four
    variants each, and the layer row their sum."""
    out = tmp_path / "projection.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/lora_projection.py", "--tiny", "--dtype=float32", f"--json={out}"],
        cwd=train_fakes.ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["projection"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["q", "k", "v", "o", "gate", "up", "down", "layer"]
    assert (rows["gate"]["in"], rows["gate"]["out"]) == (64, 128) and (rows["down"]["in"], rows["down"]["out"]) == (128, 64)
    variants = ("full", "frozen", "merged", "unmerged")
    assert all(rows[p][v] > 0 for p in rows for v in variants)
    for v in variants:
        assert abs(rows["layer"][v] - sum(r[v] for name, r in rows.items() if name != "layer")) < 1e-9
    assert "| layer | - |" in result.stdout
