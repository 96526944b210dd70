"""`python -m flan_jax.inspect_mixture`: what a mixture will feed the model, measured on a sample.

  python -m flan_jax.inspect_mixture --mixture=t0 --seq_len=1024 --tokenizer=tok.model \\
      [--num_examples_per_task=200] [--render=TASK --n=5] [--plot=shares.png] \\
      [--task_modules=flan_jax_tasks,my_lab.tasks] [--num_shots=3 --template_set=eval --split=validation]

`--task_modules` imports the task packages first (as config.data.task_modules does for a run; the
default is the built-in flan_jax_tasks); `--num_shots` and `--template_set` render and measure the
prompts as a k-shot training mixture or evaluation (held-out templates) would build them.

Prints the per-task table of `flan_jax.data.mixture_report` (rates, shares of examples and tokens,
over-long counts, packing fill); without `--tokenizer` a small sentencepiece model is trained on
the sample so lengths are realistic.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import app, flags

from flan_jax import cli, data
from flan_jax.data import mixture_report
from flan_jax.data import tokenizer as tokenizer_lib


def define_flags() -> None:
    flags.DEFINE_string("mixture", None, "registered mixture or task", required=True)
    flags.DEFINE_list("task_modules", [data.BUILTIN_TASK_MODULE], "modules that register tasks, as config.data.task_modules")
    flags.DEFINE_integer("num_shots", 0, "few-shot exemplars before each prompt, as config.eval.num_shots")
    flags.DEFINE_enum("template_set", "train", ["train", "eval"], "training or evaluation (held-out) templates")
    flags.DEFINE_string("split", "train", "split to inspect")
    flags.DEFINE_integer("seq_len", 1024, "row length for truncation and packing")
    flags.DEFINE_string("tokenizer", "", "sentencepiece .model or HF tokenizer.json (default: train one on the sample)")
    flags.DEFINE_integer("num_examples_per_task", 200, "examples sampled per task")
    flags.DEFINE_integer("num_mixed_examples", 2000, "examples of the mixed stream packed to measure the fill rate")
    flags.DEFINE_integer("num_packing_bins", 64, "best-fit look-ahead, as config.data.num_packing_bins")
    flags.DEFINE_enum("overlong", "truncate", ["truncate", "drop"], "as config.data.overlong")
    flags.DEFINE_string("render", "", "also print examples of this task")
    flags.DEFINE_integer("n", 5, "how many examples --render prints")
    flags.DEFINE_string("plot", "", "save a bar chart of token shares to this PNG")
    flags.DEFINE_integer("seed", 0, "sampling seed")


def _load_tokenizer_file(path: str) -> tokenizer_lib.Tokenizer:
    if path.endswith(".json") or pathlib.Path(path).is_dir():
        return tokenizer_lib.HFTokenizer(path)
    return tokenizer_lib.SentencePieceTokenizer(path)


def main(argv: Sequence[str]) -> None:
    del argv
    try:
        _run(flags.FLAGS)
    except data.DataError as error:  # unknown names, missing data: say so without a traceback
        raise SystemExit(f"inspect_mixture: {error}") from None


def _run(FLAGS) -> None:
    data.import_task_modules(FLAGS.task_modules)
    shots = dict(num_shots=FLAGS.num_shots, template_set=FLAGS.template_set)
    if FLAGS.render:
        print(mixture_report.render_examples(FLAGS.render, FLAGS.n, split=FLAGS.split, seed=FLAGS.seed, **shots))
        print()
    tokenizer = _load_tokenizer_file(FLAGS.tokenizer) if FLAGS.tokenizer else None
    report = mixture_report.inspect(
        FLAGS.mixture,
        seq_len=FLAGS.seq_len,
        tokenizer=tokenizer,
        split=FLAGS.split,
        num_examples_per_task=FLAGS.num_examples_per_task,
        num_mixed_examples=FLAGS.num_mixed_examples,
        num_packing_bins=FLAGS.num_packing_bins,
        overlong=FLAGS.overlong,
        seed=FLAGS.seed,
        **shots,
    )
    print(report.table())
    if FLAGS.plot:
        mixture_report.plot_token_shares(report, FLAGS.plot)
        print(f"\nSaved the token-share chart to {FLAGS.plot}")


def run() -> None:
    cli.define_main_flags(define_flags)
    app.run(main)


if __name__ == "__main__":
    run()
