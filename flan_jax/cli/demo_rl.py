"""The demo's RL stage: GRPO of the tuned demo model, rewarded by the synthetic tasks' own exact match.

After SFT (and the preference stage), `run_stage` trains the GRPO demo config
(flan_jax/cli/grpo_demo_config.py, re-exported by configs/grpo_demo.py) on top of the SFT run's
config, from the SFT workdir, through the ordinary trainer into `<workdir>/rl`, and `read_stage`
puts one row per stage side by side: exact match and rank classification of (a) the seen tasks
with held-out templates and (b) the held-out cluster, read back from the eval files and printed as
they are; `training_reward` gives the reward of the first and last logged training steps.
"""

from __future__ import annotations

import json
import pathlib

from flan_jax.cli import grpo_demo_config

QUESTIONS = ("synthetic_eval_seen_heldout_templates", "synthetic_eval_heldout_cluster")
STAGE_DIR = "rl"


def load_grpo_config(sft_config, sft_workdir: pathlib.Path, num_steps: int | None = None, seed: int | None = None):
    """The RL stage's config on top of the SFT run's (`num_steps`, `seed`: override them)."""
    config = grpo_demo_config.rl_config(sft_config, str(sft_workdir))
    if num_steps is not None:
        config.train.num_steps = num_steps
    if seed is not None:
        config.seed = seed
    return config


def run_stage(sft_config, sft_workdir: pathlib.Path, num_steps: int | None = None, workdir: pathlib.Path | None = None,
              seed: int | None = None) -> tuple[pathlib.Path, int]:
    """Trains GRPO from the SFT workdir; returns (its workdir, final step)."""
    from flan_jax.train import loop

    config = load_grpo_config(sft_config, sft_workdir, num_steps, seed)
    workdir = workdir or sft_workdir / STAGE_DIR
    loop.train(config, workdir)
    return workdir, int(config.train.num_steps)


def _cell(results: dict, question: str, metric: str) -> str:
    value = results.get("mixtures", {}).get(question, {}).get(metric)
    return "-" if value is None else f"{value:.1f}"


def stage_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown, one row per model: exact match / rank classification of (a) and (b)."""
    lines = ["| model | (a) exact match | (a) rank classification | (b) exact match | (b) rank classification |",
             "|---|---:|---:|---:|---:|"]
    for title, results in rows:
        cells = [_cell(results, q, m) for q in QUESTIONS for m in ("exact_match", "rank_classification")]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_reward(workdir: pathlib.Path, last: int = 3) -> tuple[float, float]:
    """Mean reward (= exact match of the sampled completions) of the first and the last `last` logged steps."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [r["reward"] for r in records]
    return sum(rewards[:last]) / len(rewards[:last]), sum(rewards[-last:]) / len(rewards[-last:])


def read_stage(sft_workdir: pathlib.Path, final_sft_step: int, rl_step: int, preference: tuple[pathlib.Path, int] | None = None) -> str:
    from flan_jax.cli import demo

    rows = [("untrained", demo.read_eval(sft_workdir, 0)), ("SFT", demo.read_eval(sft_workdir, final_sft_step))]
    if preference is not None:
        rows.append(("SFT + DPO", demo.read_eval(*preference)))
    rows.append(("SFT + GRPO", demo.read_eval(sft_workdir / STAGE_DIR, rl_step)))
    return stage_table(rows)
