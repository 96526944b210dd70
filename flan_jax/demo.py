"""The embedded demo (`make demo`): tune a tiny model on the built-in mixture and show what changed.

Runs `configs/demo.py` through the ordinary trainer (the same code a real experiment uses), which
evaluates the untrained model at step 0 and the tuned model at the end, then prints FLAN's two
questions side by side:

  (a) seen tasks, rendered with instruction templates never used in training;
  (b) a task cluster never trained on at all.

Then a preference stage (flan_jax/demo_preference.py): DPO of the tuned model on the synthetic
verifiable pairs, with a row beside the untrained and SFT ones (and pair accuracies), and an RL
stage (flan_jax/demo_rl.py): GRPO of the tuned model on the seen tasks, rewarded by their own exact
match, with one row per stage.

The numbers are read back from the workdir's `eval/step_<N>.json` and printed as they are.

  python -m flan_jax.demo --workdir=workdirs/demo [--num_steps=600] [--preference_steps=120 | 0] [--rl_steps=N | 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import ml_collections

from flan_jax import host_memory

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.py"
QUESTIONS = {
    "synthetic_eval_seen_heldout_templates": "(a) seen tasks, held-out templates",
    "synthetic_eval_heldout_cluster": "(b) held-out cluster",
}


def load_config(path: pathlib.Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("flan_jax_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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


def comparison_table(before: dict, after: dict) -> str:
    """Untrained -> tuned, per evaluation question and per cluster, as Markdown.

    Rank classification (scoring each answer option, no generation) exists only for tasks with
    options; the target loss exists for all and shows progress before exact match does.
    """
    header = " | ".join(f"{title}: untrained -> tuned" for _, title in METRICS)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--num_steps", type=int, default=None, help="override config.train.num_steps")
    parser.add_argument("--preference_steps", type=int, default=None,
                        help="DPO steps of the preference stage (default: configs/dpo_demo.py's; 0: skip the stage)")
    parser.add_argument("--rl_steps", type=int, default=None,
                        help="GRPO steps of the RL stage (default: configs/grpo_demo.py's; 0: skip the stage)")
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir).resolve()

    config = load_config(DEMO_CONFIG)
    if args.num_steps is not None:
        config.train.num_steps = args.num_steps
    print(f"flan_jax demo: workdir {workdir}", flush=True)

    from flan_jax.train import loop  # imported late so --help stays fast

    started = time.time()
    loop.train(config, workdir)
    minutes = (time.time() - started) / 60

    final_step = config.train.num_steps
    before, after = read_eval(workdir, 0), read_eval(workdir, final_step)
    print()
    print(f"The untrained model (step 0) vs the tuned model (step {final_step}) on "
          f"{config.eval.max_examples_per_task} validation examples per task (macro averages over tasks):")
    print(comparison_table(before, after))
    print()
    print("Sample generations of the tuned model:")
    print(sample_generations(workdir, final_step))
    print()
    if args.preference_steps != 0:
        from flan_jax import demo_preference

        print(f"Preference stage: DPO of the tuned model on the synthetic pairs (correct vs wrong answer), "
              f"{workdir / 'preference'}", flush=True)
        dpo_workdir, dpo_step = demo_preference.run_stage(config, workdir, args.preference_steps)
        minutes = (time.time() - started) / 60
        print()
        print("Untrained, SFT and SFT + DPO, (a) seen tasks with held-out templates, (b) the held-out cluster; "
              "pair accuracy = % of held-out pairs where the correct answer is the more likely one:")
        print(demo_preference.read_stage(workdir, final_step, dpo_step))
        print()
    if args.rl_steps != 0:
        from flan_jax import demo_rl

        print(f"RL stage: GRPO of the tuned model on the seen tasks (training templates), rewarded by their own exact "
              f"match, {workdir / demo_rl.STAGE_DIR}", flush=True)
        _, rl_step = demo_rl.run_stage(workdir, args.rl_steps)
        minutes = (time.time() - started) / 60
        first, last = demo_rl.training_reward(workdir / demo_rl.STAGE_DIR)
        print()
        print(f"One row per stage, (a) seen tasks with held-out templates, (b) the held-out cluster (GRPO's training "
              f"reward, the exact match of its sampled answers: {100 * first:.1f}% -> {100 * last:.1f}%):")
        preference = (workdir / "preference", dpo_step) if args.preference_steps != 0 else None
        print(demo_rl.read_stage(workdir, final_step, rl_step, preference))
        print()
    print(f"Trained and evaluated in {minutes:.1f} minutes. Everything is in {workdir}:")
    print(f"  metrics  {workdir / 'metrics.jsonl'}")
    print(f"  eval     {workdir / 'eval'} (step_0.json, step_{final_step}.json, predictions_{final_step}.jsonl)")
    print(f"  explore  colabs/explore_checkpoint.ipynb with FLAN_JAX_WORKDIR={workdir}")
    return 0


if __name__ == "__main__":
    host_memory.reexec_with_tuned_malloc()
    sys.exit(main())
