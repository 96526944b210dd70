"""The Colab notebooks run top to bottom on CPU (nbclient) against a small workdir made here, and plot images;
the evaluation CLI runs on the same workdir."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLABS = ROOT / "colabs"


def _demo_config():
    spec = importlib.util.spec_from_file_location("configs_demo", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _execute(name: str, monkeypatch, env: dict[str, str], path: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    """Runs colabs/<name>.ipynb in a fresh kernel (cwd colabs/, one CPU device) and returns it with outputs.

    `path`: folders the kernel imports from besides the repository (a user's task package).
    """
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XLA_FLAGS", "")  # a notebook user has one CPU device, not the suite's 8 simulated ones
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *path]))
    notebook = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(COLABS)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on the first error
    return notebook


def _outputs(notebook, output_type=None):
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output_type is None or output.output_type == output_type
    ]


def _images(notebook):
    return [o for o in _outputs(notebook) if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def _text(notebook):
    parts = []
    for output in _outputs(notebook):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            parts.append(output.data.get("text/markdown", "") + output.data.get("text/plain", ""))
    return "\n".join(parts)


USER_TASKS = """
from flan_jax import data

data.register_task(data.Task(
    "nb_user.echo",
    data.InMemorySource({"validation": [{"word": w} for w in ("alpha", "beta", "gamma")]}),
    [("Repeat: {word}", "{word}")], metrics=("exact_match",), cluster="user",
))
"""


@pytest.fixture(scope="module")
def user_tasks_dir(tmp_path_factory):
    """A user's task package outside tasks/, which the notebook workdir's run names in config.data.task_modules."""
    folder = tmp_path_factory.mktemp("user_tasks")
    (folder / "nb_user_tasks.py").write_text(USER_TASKS)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("nb_user_tasks", None)
    from flan_jax import data

    data.unregister("nb_user.echo")


@pytest.fixture(scope="module")
def small_workdir(tmp_path_factory, user_tasks_dir):
    """A few training steps of the demo setup with a tiny model: two checkpoints, metrics and two evaluations.

    It also evaluates a task of the user's own package (config.data.task_modules), which a notebook
    or evaluation opening the workdir must import to see.
    """
    from flan_jax.train.loop import train

    workdir = tmp_path_factory.mktemp("notebook_run")
    config = _demo_config()
    config.data.task_modules = (*config.data.task_modules, "nb_user_tasks")
    config.eval.mixtures = ("nb_user.echo", *config.eval.mixtures)  # first: the notebook shows the first tasks
    config.data.seq_len = 128
    config.data.batch_size = 8
    config.data.tokenizer.vocab_size = 400
    config.data.tokenizer.train_examples = 400
    config.model.update(vocab_size=400, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                        max_positions=256)
    config.optimizer.warmup_steps = 1
    config.train.update(num_steps=4, log_every=1, progress_bar=False)
    config.checkpoint.update(every_steps=2, async_save=False)
    config.eval.update(at_start=True, at_end=True, max_examples_per_task=2, max_new_tokens=4, batch_size=8)
    train(config, str(workdir))
    return workdir


def test_explore_checkpoint_notebook(small_workdir, user_tasks_dir, monkeypatch):
    notebook = _execute("explore_checkpoint", monkeypatch, {"FLAN_JAX_WORKDIR": str(small_workdir)},
                        path=(str(user_tasks_dir),))
    assert not _outputs(notebook, "error")
    assert "| nb_user.echo | Repeat: alpha |" in _text(notebook)  # the run's own task, from its task_modules
    assert len(_images(notebook)) >= 2  # loss / learning-rate curves, per-task bar chart
    text = _text(notebook)
    assert "checkpoints: [2, 4]" in text
    assert "| step 2 | step 4 |" in text  # the side-by-side comparison
    assert "training PartitionSpec" in text and "Per task" in text
    assert re.search(r"the run trains ([\d,]+) of \1 parameters \(100\.00%\)", text)  # full fine-tuning: all trained


def test_register_a_task_notebook(tmp_path, monkeypatch):
    notebook = _execute(
        "register_a_task", monkeypatch, {"FLAN_JAX_NOTEBOOK_WORKDIR": str(tmp_path), "FLAN_JAX_NOTEBOOK_STEPS": "6"}
    )
    assert not _outputs(notebook, "error")
    assert len(_images(notebook)) >= 3  # packing, loss curve, before/after bars
    text = _text(notebook)
    assert "eval template 'eval1'" in text and "fill rate" in text
    assert (tmp_path / "eval" / "step_6.json").is_file() and (tmp_path / "eval" / "step_0.json").is_file()


def test_evaluate_cli_on_the_workdir(small_workdir, user_tasks_dir):
    """`python -m flan_jax.evaluate` restores a chosen checkpoint and writes its results (config overrides work)."""
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": os.pathsep.join([str(ROOT), str(user_tasks_dir)])}
    command = [
        sys.executable, "-m", "flan_jax.evaluate", "--config=configs/demo.py", f"--workdir={small_workdir}", "--step=2",
        "--config.eval.max_examples_per_task=1", "--config.eval.max_new_tokens=2",
        "--config.eval.mixtures=('synthetic_eval_heldout_cluster',)",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((small_workdir / "eval" / "step_2.json").read_text())
    assert results["step"] == 2 and list(results["mixtures"]) == ["synthetic_eval_heldout_cluster"]
    assert all(t["num_examples"] == 1 for t in results["tasks"].values())
    assert "Per task" in done.stdout

    misspelt = subprocess.run([*command[:4], "--config.eval.max_new_tokenz=2"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert misspelt.returncode != 0 and "max_new_tokenz" in misspelt.stderr

    # A step that is not (or no longer) in the workdir: one clear line, exit 4, no traceback.
    removed = subprocess.run([*command[:5], "--step=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert removed.returncode == 4 and "Traceback" not in removed.stderr
    assert "no checkpoint of step 1" in removed.stderr and "retention removed it" in removed.stderr
