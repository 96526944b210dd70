"""A built wheel is a working flan_jax: `python -m flan_jax.demo` runs from it, outside the repository.

The wheel is built from a copy of the sources (no network, no build isolation: the running
environment's setuptools), installed with `pip --target` into a temporary folder and run from
another folder, so nothing of the checkout (configs/, tasks/) can be reached.
"""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests import train_fakes

ROOT = train_fakes.ROOT


def _pip(*args: str, cwd: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--no-build-isolation", "-q"],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("flan_jax", "tasks"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "-w", str(out), str(source), cwd=source)
    (path,) = out.glob("flan_jax-*.whl")
    return path


def test_the_wheel_ships_the_demo_and_the_builtin_tasks_under_our_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"flan_jax", "flan_jax_tasks"}  # never a top-level `tasks` beside the user's own
    assert {"flan_jax/cli/demo.py", "flan_jax/cli/demo_config.py", "flan_jax_tasks/__init__.py", "flan_jax_tasks/synthetic.py"} <= set(names)


def test_the_demo_runs_from_an_installed_wheel(wheel, tmp_path, tokenizer_path, cache_dir):
    target = tmp_path / "site"
    _pip("install", "--target", str(target), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = train_fakes.subprocess_env(cache_dir, PYTHONPATH=str(target))
    where = subprocess.run(
        [sys.executable, "-c", "import flan_jax, flan_jax_tasks; print(flan_jax.__file__); print(flan_jax_tasks.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60,
    )
    assert where.stdout.split() == [str(target / "flan_jax" / "__init__.py"), str(target / "flan_jax_tasks" / "__init__.py")]

    overrides = train_fakes.demo_overrides(
        tokenizer_path, train__num_steps=2, checkpoint__every_steps=2, eval__max_examples_per_task=1,
        eval__max_new_tokens=2, eval__mixtures=("synthetic_eval_heldout_cluster",),
    )
    result = subprocess.run(
        [sys.executable, "-m", "flan_jax.demo", f"--workdir={tmp_path / 'run'}", *train_fakes.cli_args(overrides)],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "The untrained model (step 0) vs the tuned model (step 2)" in result.stdout
    assert "| (b) held-out cluster |" in result.stdout and "Sample generations of the tuned model:" in result.stdout
    assert (tmp_path / "run" / "eval" / "step_2.json").is_file()
