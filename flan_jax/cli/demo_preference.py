"""The demo's preference stage: DPO of the tuned demo model on the synthetic verifiable pairs.

After SFT (flan_jax/cli/demo.py), `run_stage` trains the DPO demo config (flan_jax/cli/dpo_demo_config.py,
re-exported by configs/dpo_demo.py) on top of the SFT run's config, from the SFT workdir, through
the ordinary trainer (reference log-probs cached once, then DPO) into `<workdir>/preference`, and
`stage_table` puts the three models side by side, read back from the eval files and printed as they
are:

  exact match / rank classification   (a) seen tasks with held-out templates, (b) held-out cluster
  pair accuracy (log-prob)            % of held-out pairs whose correct answer the model finds more
                                      likely than the wrong one (the same measure for all three rows)
  implicit reward accuracy            DPO only: % of pairs with a higher implicit reward
                                      beta (log pi - log pi_ref) for the correct answer

The untrained and SFT rows' pair accuracies come from evaluating those two models on the pair
mixtures (one packed scoring pass each), written to `<workdir>/preference/baselines/`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from flan_jax.cli import dpo_demo_config

SFT_QUESTIONS = ("synthetic_eval_seen_heldout_templates", "synthetic_eval_heldout_cluster")
PAIR_QUESTIONS = ("synthetic_pairs_eval_seen_heldout_templates", "synthetic_pairs_eval_heldout_cluster")


def load_dpo_config(sft_config, sft_workdir: pathlib.Path, num_steps: int | None = None):
    """The preference stage's config on top of the SFT run's (`num_steps`: override its length)."""
    config = dpo_demo_config.preference_config(sft_config, str(sft_workdir))
    if num_steps is not None:
        config.train.num_steps = num_steps
    return config


def _pair_baseline(model, tokenizer, config, folder: pathlib.Path, name: str) -> dict[str, Any]:
    from flan_jax.eval import evaluator

    pair_config = config.copy_and_resolve_references()
    pair_config.eval.mixtures = PAIR_QUESTIONS
    results = evaluator.evaluate(model, tokenizer, pair_config, workdir=None, step=0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({k: results[k] for k in ("tasks", "mixtures", "summary")}, indent=2) + "\n")
    return results


def run_stage(sft_config, sft_workdir: pathlib.Path, num_steps: int | None = None) -> tuple[pathlib.Path, int]:
    """Evaluates the untrained and SFT models on the pairs, then trains DPO; returns (its workdir, final step)."""
    import jax

    from flan_jax.data.tokenizer import load_tokenizer
    from flan_jax.train import checkpointing, loop, partitioning, state as state_lib

    from flan_jax import data

    config = load_dpo_config(sft_config, sft_workdir, num_steps)
    data.import_task_modules(config.data.task_modules)  # the pair mixtures the baselines score
    workdir = sft_workdir / "preference"
    tokenizer = load_tokenizer(sft_config.data, workdir=sft_workdir)
    mesh = jax.make_mesh((1, 1, 1), partitioning.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.local_devices()[:1])
    _, parts = loop.build_model(sft_config, mesh, partitioning.axis_rules(sft_config.mesh))
    with jax.set_mesh(mesh):
        untrained = parts.merge(state_lib.init_params(parts, mesh))  # the SFT run's step 0 (same seed)
        _pair_baseline(untrained, tokenizer, config, workdir / "baselines", "untrained")
    del untrained
    sft_model, _, _ = checkpointing.load_model(sft_workdir)
    _pair_baseline(sft_model, tokenizer, config, workdir / "baselines", "sft")
    del sft_model
    loop.train(config, workdir)
    return workdir, int(config.train.num_steps)


def _mixture(results: dict, name: str, metric: str) -> str:
    value = results.get("mixtures", {}).get(name, {}).get(metric)
    return "-" if value is None else f"{value:.1f}"


def stage_table(untrained: dict, sft: dict, dpo: dict, pair_untrained: dict, pair_sft: dict) -> str:
    """Markdown: one row per model; SFT metrics of the two evaluation questions, then pair accuracies."""
    header = ("| model | (a) exact match | (a) rank classification | (b) exact match | (b) rank classification "
              "| pair accuracy (a) | pair accuracy (b) | implicit reward accuracy (a) | implicit reward accuracy (b) |")
    lines = [header, "|---|" + "---:|" * 8]
    for title, sft_side, pair_side, implicit in (
        ("untrained", untrained, pair_untrained, False),
        ("SFT", sft, pair_sft, False),
        ("SFT + DPO", dpo, dpo, True),
    ):
        cells = [_mixture(sft_side, q, m) for q in SFT_QUESTIONS for m in ("exact_match", "rank_classification")]
        cells += [_mixture(pair_side, q, "logprob_accuracy") for q in PAIR_QUESTIONS]
        cells += [_mixture(pair_side, q, "pair_accuracy") if implicit else "-" for q in PAIR_QUESTIONS]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_stage(sft_workdir: pathlib.Path, final_sft_step: int, dpo_step: int) -> str:
    from flan_jax.cli import demo

    folder = sft_workdir / "preference"
    baselines = {n: json.loads((folder / "baselines" / f"{n}.json").read_text()) for n in ("untrained", "sft")}
    return stage_table(demo.read_eval(sft_workdir, 0), demo.read_eval(sft_workdir, final_sft_step),
                       demo.read_eval(folder, dpo_step), baselines["untrained"], baselines["sft"])
