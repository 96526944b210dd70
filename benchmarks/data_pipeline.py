"""Data pipeline throughput and packing fill on a real mixture (issue 3's performance targets).

Measures, on ONE core (worker_count=0, no threads), over the first `--num_examples` of the mixed stream:

  render     the registered mixture's stream -> rendered example dicts (sources, templates, mixing)
  tokenize   rendered examples -> truncated token features (sentencepiece)
  pack       features -> best-fit packed rows (`OpenRows`, `--num_packing_bins` open rows), and grain's
             BestFitPackIterDataset with as many bins as the baseline
  loader     all of it through `make_train_iterator` (row slots, batching), the trainer's real input

and the steady-state packing fill rate (non-padding tokens / all tokens) at each `--seq_lens`: the
loader's packer (`OpenRows`), grain's best-fit packer and one example per row. The pipeline is
compared with the trainer's consumption: the tokens/s of the demo model's train step (configs/demo.py:
model, batch and compute dtype; the fastest consumer this machine trains), measured in the same run
after the pipeline (`--trainer_tokens_per_sec` sets a rate instead). Targets: fill >= 98% at 1024;
loader >= 20x the trainer.

  FLAN_JAX_DATA_DIR=/path/to/data python benchmarks/data_pipeline.py --mixture=t0 [--tokenizer=tok.model]

Without `--tokenizer`, an 8,000-piece sentencepiece model is trained on `--tokenizer_examples` examples
first (not timed as part of the pipeline). Prints a Markdown table.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import grain  # noqa: E402
from absl import app, flags  # noqa: E402

from flan_jax import data, default_config  # noqa: E402
from flan_jax.data import loader, packing  # noqa: E402
from flan_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from flan_jax.data.features import FeatureConfig, featurize  # noqa: E402

flags.DEFINE_string("mixture", "t0", "registered mixture (or task) to measure")
flags.DEFINE_string("split", "train", "split")
flags.DEFINE_string("tokenizer", "", "sentencepiece .model (default: train one on the mixture first)")
flags.DEFINE_integer("tokenizer_examples", 5000, "examples to train the tokenizer on when --tokenizer is empty")
flags.DEFINE_integer("vocab_size", 8000, "pieces of the tokenizer trained when --tokenizer is empty")
flags.DEFINE_integer("num_examples", 20000, "examples of the mixed stream to measure on")
flags.DEFINE_list("seq_lens", ["1024", "2048"], "row lengths for the fill-rate comparison")
flags.DEFINE_integer("batch_size", 8, "global rows per batch for the loader measurement")
flags.DEFINE_integer("num_packing_bins", 64, "best-fit look-ahead (config.data.num_packing_bins)")
flags.DEFINE_list("fill_bins", ["16", "64"], "num_packing_bins values for the fill-rate comparison")
flags.DEFINE_float("trainer_tokens_per_sec", 0.0, "the trainer's consumption; 0: measure the demo model's step here")
flags.DEFINE_integer("seed", 0, "stream seed")


def _timed(fn):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - start_wall, time.process_time() - start_cpu


def _row(stage: str, examples: int, tokens: int, wall: float, cpu: float, trainer: float) -> str:
    return (
        f"| {stage} | {examples / wall:,.0f} | {tokens / wall:,.0f} | {tokens / cpu:,.0f} | "
        f"{tokens / wall / trainer:,.1f}x |"
    )


def measure_demo_trainer() -> float:
    """Tokens/s of the trainer's jitted step on configs/demo.py's model, batch and compute dtype (1 device)."""
    import train_throughput  # benchmarks/ is on sys.path when this file runs as a script

    from flan_jax.cli import demo_config

    config = demo_config.get_config()
    shape = dict(train_throughput.PRESETS["demo"])
    assert all(shape[k] == config.model[k] for k in ("vocab_size", "d_model", "n_layers", "d_ff")), "demo preset is stale"
    variant = "bf16" if config.model.dtype == "bfloat16" else "fp32"
    return train_throughput.run_flan_jax(shape, variant, 1, steps=10, warmup=2)["tokens_per_sec"]


def _loader_run(config, tokenizer, examples: grain.MapDataset, num_examples: int):
    """Batches from the real loader until about `num_examples` examples are consumed."""
    iterator = loader.make_train_iterator(config, tokenizer, seed=FLAGS.seed, process_index=0, process_count=1,
                                          examples=examples)
    batches = []
    while iterator.stats.total().examples < num_examples:
        batches.append(next(iterator))
    return batches, iterator.stats.total()


def main(argv: Sequence[str]) -> None:
    del argv
    data.import_task_modules([data.BUILTIN_TASK_MODULE])
    mixture = data.get_mixture(FLAGS.mixture)
    stream = mixture.get_dataset(FLAGS.split, seed=FLAGS.seed, shuffle=True)
    if FLAGS.tokenizer:
        tokenizer = tokenizer_lib.SentencePieceTokenizer(FLAGS.tokenizer)
    else:
        texts = tokenizer_lib.mixture_texts(FLAGS.mixture, split=FLAGS.split, num_examples=FLAGS.tokenizer_examples,
                                            seed=FLAGS.seed + 1)
        model, wall, _ = _timed(lambda: tokenizer_lib.train_sentencepiece(texts, FLAGS.vocab_size))
        tokenizer = tokenizer_lib.SentencePieceTokenizer(model, name=f"trained on {FLAGS.tokenizer_examples} examples")
        print(f"Trained a {tokenizer.vocab_size}-piece tokenizer on {FLAGS.tokenizer_examples:,} examples in {wall:.1f} s")

    n = FLAGS.num_examples
    seq_lens = [int(s) for s in FLAGS.seq_lens]
    first_len = seq_lens[0]

    rendered, render_wall, render_cpu = _timed(lambda: list(itertools.islice(iter(stream), n)))
    feature_config = FeatureConfig(seq_len=first_len)
    features, tok_wall, tok_cpu = _timed(lambda: [featurize(e, tokenizer, feature_config)[0] for e in rendered])
    features = [f for f in features if f is not None]
    tokens = sum(len(f["input_tokens"]) for f in features)
    rows, pack_wall, pack_cpu = _timed(
        lambda: packing.pack_list(features, seq_len=first_len, num_open_rows=FLAGS.num_packing_bins)
    )
    source = grain.MapDataset.source(features).to_iter_dataset()
    _, grain_wall, grain_cpu = _timed(
        lambda: list(packing.pack(source, seq_len=first_len, num_packing_bins=FLAGS.num_packing_bins, seed=0))
    )

    config = default_config.get_config().data
    config.batch_size = FLAGS.batch_size
    config.seq_len = first_len
    config.num_packing_bins = FLAGS.num_packing_bins
    examples = grain.MapDataset.source(rendered)  # the same examples, so only the loader's own work differs
    (batches, counts), load_wall, load_cpu = _timed(lambda: _loader_run(config, tokenizer, examples, n))
    trainer = FLAGS.trainer_tokens_per_sec or measure_demo_trainer()
    trainer_source = "given" if FLAGS.trainer_tokens_per_sec else "the demo model's train step, measured in this run"

    print(f"\nMixture {FLAGS.mixture!r}: {n:,} examples, {tokens / len(features):.1f} tokens per example at "
          f"seq_len {first_len}, trainer consumption {trainer:,.0f} tokens/s ({trainer_source})\n")
    print("| stage (1 core) | examples/s | tokens/s (wall) | tokens/s (CPU time) | x trainer |")
    print("|---|---:|---:|---:|---:|")
    print(_row("render", n, tokens, render_wall, render_cpu, trainer))
    print(_row(f"tokenize + truncate ({first_len})", n, tokens, tok_wall, tok_cpu, trainer))
    print(_row(f"best-fit pack, OpenRows ({FLAGS.num_packing_bins} rows)", n, tokens, pack_wall, pack_cpu, trainer))
    print(_row(f"(baseline) grain BestFitPack ({FLAGS.num_packing_bins} bins)", n, tokens, grain_wall, grain_cpu,
               trainer))
    # counts: every example the loader tokenized and placed into a packing bin (emitted or still open);
    # rendering them is charged at the measured render cost per example.
    share = counts.examples / n
    print(_row("render + loader (end to end)", counts.examples, counts.tokens, share * render_wall + load_wall,
               share * render_cpu + load_cpu, trainer))
    print(f"\nLoader batches: {len(batches)} x {FLAGS.batch_size} x {first_len}; over-long examples: "
          f"{counts.truncated + counts.response_truncated:,} truncated, {counts.dropped:,} dropped of {counts.examples:,}")

    # Fill rates, in steady state (packing.steady_state_fill: the sample's lengths, cycled, warm-up left
    # out), per packing look-ahead; grain's packer on the sample cycled 3 times, final flush left out.
    bins = [int(b) for b in FLAGS.fill_bins]
    print("\n| seq_len | " + " | ".join(f"loader packing (OpenRows), {b} open rows" for b in bins)
          + f" | grain BestFitPack, {FLAGS.num_packing_bins} bins | one example per row |")
    print("|---:|" + "---:|" * (len(bins) + 2))
    for seq_len in seq_lens:
        feature_config = FeatureConfig(seq_len=seq_len)
        features = [f for f in (featurize(e, tokenizer, feature_config)[0] for e in rendered) if f]
        padded_fill = sum(len(f["input_tokens"]) for f in features) / (len(features) * seq_len)
        packed = [packing.steady_state_fill(features, seq_len=seq_len, num_open_rows=b) for b in bins]
        source = grain.MapDataset.source(features * 3).to_iter_dataset()
        grain_rows = list(packing.pack(source, seq_len=seq_len, num_packing_bins=FLAGS.num_packing_bins, seed=0))
        grain_rows = grain_rows[: -(len(grain_rows) % FLAGS.num_packing_bins or FLAGS.num_packing_bins)] or grain_rows
        print(f"| {seq_len} | " + " | ".join(f"{fill:.2%}" for fill in packed)
              + f" | {packing.fill_rate(grain_rows):.2%} | {padded_fill:.2%} |")


FLAGS = flags.FLAGS

if __name__ == "__main__":
    # The train-step baseline runs as the trainer does (flan_jax/host_memory.py).
    from flan_jax import host_memory

    host_memory.reexec_with_tuned_malloc(default=True)
    app.run(main)
