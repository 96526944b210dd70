"""What a mixture will feed the model: per-task examples, rates, shares of examples and tokens, over-long
counts and packing fill, measured on a sample of each task.

    report = mixture_report.inspect("t0", seq_len=1024, tokenizer=tok)   # a MixtureReport
    print(report.table()); mixture_report.plot_token_shares(report, "shares.png")

The command line is `python -m flan_jax.inspect_mixture` (flan_jax/cli/inspect_mixture.py).
`num_shots` and `template_set` render and measure the prompts as a k-shot training mixture or
evaluation (`config.eval.num_shots`, held-out templates) would build them.

Why tokens and not only examples: a task's rate sets its share of *examples*, but its share of the
*training signal* is rate x tokens per example, which long-document tasks (summarization) inflate.
Without a tokenizer, a small sentencepiece model is trained on the sample so lengths are realistic.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from collections.abc import Sequence

import numpy as np

from flan_jax import data
from flan_jax.data import packing
from flan_jax.data import tokenizer as tokenizer_lib
from flan_jax.data.features import FeatureConfig, FeatureStats, featurize


@dataclasses.dataclass
class TaskReport:
    name: str
    available: int  # examples in the split
    rate: float  # normalised mixing rate = expected share of examples
    sampled: int = 0
    mean_tokens: float = 0.0  # features per example after truncation, over the sample
    token_share: float = 0.0  # expected share of the mixture's tokens
    truncated: int = 0  # in the sample (instruction and/or response cut)
    dropped: int = 0  # in the sample
    fill_rate: float = 0.0  # the task's sample packed alone
    cluster: str = ""  # the task's cluster (FLAN groups held-out evaluation by it)


@dataclasses.dataclass
class MixtureReport:
    name: str
    split: str
    seq_len: int
    tokenizer: str
    tasks: list[TaskReport]
    mixed_examples: int = 0  # examples of the mixed stream packed for `fill_rate`
    fill_rate: float = 0.0  # the mixed stream packed with best fit
    padded_fill_rate: float = 0.0  # the same examples one per row

    def table(self) -> str:
        """A Markdown table, largest token share first."""
        lines = [
            f"Mixture {self.name!r} (split {self.split!r}, seq_len {self.seq_len}, tokenizer {self.tokenizer})",
            "",
            "| task | available | rate | example share | token share | mean tokens | truncated | dropped | fill |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in sorted(self.tasks, key=lambda t: (-t.token_share, t.name)):
            lines.append(
                f"| {t.name} | {t.available:,} | {t.rate:.4f} | {t.rate:.2%} | {t.token_share:.2%} | "
                f"{t.mean_tokens:.1f} | {t.truncated}/{t.sampled} | {t.dropped}/{t.sampled} | {t.fill_rate:.1%} |"
            )
        clusters = by_cluster(self.tasks)
        if len(clusters) > 1:
            lines += ["", "| cluster | tasks | available | example share | token share | truncated |", "|---|---:|---:|---:|---:|---:|"]
            for c in sorted(clusters, key=lambda c: -c.token_share):
                lines.append(
                    f"| {c.name} | {c.tasks} | {c.available:,} | {c.rate:.2%} | {c.token_share:.2%} | "
                    f"{c.truncated}/{c.sampled} |"
                )
        lines += [
            "",
            f"Mixed stream, {self.mixed_examples:,} examples: packing fill {self.fill_rate:.2%} "
            f"versus {self.padded_fill_rate:.2%} with one example per row.",
        ]
        return "\n".join(lines)


def _packed_fill(features: list[dict], seq_len: int, num_packing_bins: int) -> float:
    """Steady-state fill of the loader's packing (`OpenRows`) for the sample's lengths."""
    return packing.steady_state_fill(features, seq_len=seq_len, num_open_rows=num_packing_bins)


def _padded_fill(features: list[dict], seq_len: int) -> float:
    return sum(len(f["input_tokens"]) for f in features) / max(len(features) * seq_len, 1)


def _sample(task: data.Task, split: str, n: int, seed: int, num_shots: int = 0, template_set: str = "train") -> list[dict]:
    if task.num_examples(split) == 0:
        return []
    dataset = task.get_dataset(split, seed=seed, shuffle=True, num_shots=num_shots, template_set=template_set)
    # Evaluation-only records may have no targets (scored on their references): measure the prompt alone.
    return [{**e, "targets": e["targets"] or ""} for e in itertools.islice(iter(dataset), n)]


def inspect(
    mixture_name: str,
    *,
    seq_len: int = 1024,
    tokenizer: tokenizer_lib.Tokenizer | None = None,
    split: str = "train",
    num_examples_per_task: int = 200,
    num_mixed_examples: int = 2000,
    num_packing_bins: int = 64,
    overlong: str = "truncate",
    seed: int = 0,
    tokenizer_vocab_size: int = 8000,
    num_shots: int = 0,
    template_set: str = "train",
) -> MixtureReport:
    """Measures a registered mixture (or task) on samples; see the module docstring."""
    mixture = data.get_mixture(mixture_name)
    rates = mixture.rates()
    tasks = sorted(mixture.tasks, key=lambda t: t.name)
    samples = {task.name: _sample(task, split, num_examples_per_task, seed, num_shots, template_set) for task in tasks}
    if tokenizer is None:
        texts = [text for sample in samples.values() for e in sample for text in (e["inputs"], e["targets"])]
        tokenizer = tokenizer_lib.SentencePieceTokenizer(
            tokenizer_lib.train_sentencepiece(texts, tokenizer_vocab_size), name="trained on the sample"
        )
    config = FeatureConfig(seq_len=seq_len, overlong=overlong)

    reports = []
    for task in tasks:
        stats = FeatureStats()
        features = []
        for example in samples[task.name]:
            feature, outcome = featurize(example, tokenizer, config)
            stats.add(task.name, outcome, 0 if feature is None else len(feature["input_tokens"]))
            if feature is not None:
                features.append(feature)
        counts = stats.total()
        reports.append(
            TaskReport(
                name=task.name,
                available=task.num_examples(split),
                rate=rates.get(task.name, 0.0),
                sampled=counts.examples,
                mean_tokens=counts.tokens / max(counts.examples, 1),
                truncated=counts.truncated + counts.response_truncated,
                dropped=counts.dropped,
                fill_rate=_packed_fill(features, seq_len, num_packing_bins),
                cluster=task.cluster,
            )
        )
    weighted = {r.name: r.rate * r.mean_tokens for r in reports}
    total = sum(weighted.values()) or 1.0
    for r in reports:
        r.token_share = weighted[r.name] / total

    mixed = []
    stream = mixture.get_dataset(split, seed=seed, shuffle=True, num_shots=num_shots, template_set=template_set)
    for example in itertools.islice(iter(stream), num_mixed_examples):
        feature, _ = featurize({**example, "targets": example["targets"] or ""}, tokenizer, config)
        if feature is not None:
            mixed.append(feature)
    return MixtureReport(
        name=mixture_name,
        split=split,
        seq_len=seq_len,
        tokenizer=getattr(tokenizer, "name", repr(tokenizer)),
        tasks=reports,
        mixed_examples=len(mixed),
        fill_rate=_packed_fill(mixed, seq_len, num_packing_bins),
        padded_fill_rate=_padded_fill(mixed, seq_len),
    )


def render_examples(
    task_name: str, n: int, *, split: str = "train", seed: int = 0, num_shots: int = 0, template_set: str = "train"
) -> str:
    """The first `n` rendered examples of a task (k-shot, training or evaluation templates), to check by eye."""
    task = data.get_task(task_name)
    dataset = task.get_dataset(split, seed=seed, shuffle=True, num_shots=num_shots, template_set=template_set)
    how = f"{num_shots}-shot, {template_set} templates" if num_shots else f"{template_set} templates"
    blocks = []
    for i, example in enumerate(itertools.islice(iter(dataset), n)):
        targets = example["targets"] if example["targets"] is not None else f"(none; references {example['references']})"
        blocks.append(
            f"----- {task_name} example {i} -----\n[inputs]\n{example['inputs']}\n[targets]\n{targets}\n"
            f"[template] {example['template']!r} ({how})"
        )
    return "\n".join(blocks) if blocks else f"task {task_name!r} has no examples in split {split!r}"


@dataclasses.dataclass
class GroupReport:
    name: str
    tasks: int
    available: int
    rate: float
    token_share: float
    truncated: int
    sampled: int


def _group(name: str, tasks: Sequence[TaskReport]) -> GroupReport:
    return GroupReport(
        name=name,
        tasks=len(tasks),
        available=sum(t.available for t in tasks),
        rate=sum(t.rate for t in tasks),
        token_share=sum(t.token_share for t in tasks),
        truncated=sum(t.truncated for t in tasks),
        sampled=sum(t.sampled for t in tasks),
    )


def by_cluster(tasks: Sequence[TaskReport]) -> list[GroupReport]:
    """Task reports summed per cluster (tasks without one form the cluster "(none)")."""
    clusters: dict[str, list[TaskReport]] = {}
    for task in tasks:
        clusters.setdefault(task.cluster or "(none)", []).append(task)
    return [_group(name, members) for name, members in sorted(clusters.items())]


def chart_rows(report: MixtureReport, max_bars: int) -> list[TaskReport | GroupReport]:
    """Bars by increasing token share: one per task, or one per cluster when there are more than
    `max_bars` tasks (T0 has ~300); beyond `max_bars` groups, the smallest are summed into one bar."""
    rows: list = list(report.tasks)
    if len(rows) > max_bars:
        clusters = by_cluster(report.tasks)
        if len(clusters) > 1:
            rows = clusters
    rows.sort(key=lambda r: (r.token_share, r.name))
    if len(rows) <= max_bars:
        return rows
    rest = rows[: len(rows) - max_bars + 1]
    other = GroupReport(
        name=f"({len(rest)} others)",
        tasks=sum(getattr(r, "tasks", 1) for r in rest),
        available=sum(r.available for r in rest),
        rate=sum(r.rate for r in rest),
        token_share=sum(r.token_share for r in rest),
        truncated=sum(r.truncated for r in rest),
        sampled=sum(r.sampled for r in rest),
    )
    return [other] + rows[len(rest) :]


def plot_token_shares(report: MixtureReport, path: str | pathlib.Path, *, max_bars: int = 40) -> None:
    """A horizontal bar chart of token share (and example share) per task, saved as PNG."""
    # matplotlib's object API: no pyplot, so the caller's backend and open figures are left alone.
    from matplotlib.figure import Figure

    tasks = chart_rows(report, max_bars)
    height = max(3.0, 0.22 * len(tasks) + 1.5)
    fig = Figure(figsize=(9, height))
    ax = fig.subplots()
    y = np.arange(len(tasks))
    ax.barh(y + 0.2, [100 * t.token_share for t in tasks], height=0.4, label="share of tokens")
    ax.barh(y - 0.2, [100 * t.rate for t in tasks], height=0.4, label="share of examples (rate)")
    ax.set_yticks(y, [t.name if isinstance(t, TaskReport) else f"{t.name} ({t.tasks} tasks)" for t in tasks], fontsize=7)
    ax.set_xlabel("%")
    ax.set_title(f"{report.name}: token shares at seq_len {report.seq_len} (fill {report.fill_rate:.1%})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
