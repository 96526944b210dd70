"""Benchmark: rendering throughput of the data core (source -> preprocess -> template -> mixed stream).

Builds one task per T0/P3 file straight from the data core API (so it measures only
flan_jax.data sources/templates/mixing, not tokenization or packing), mixes them
examples-proportionally with a cap, and times random access on the infinite stream, the path the
loader uses. Run on a quiet machine:

    FLAN_JAX_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/render_mixture.py --examples=20000
"""

from __future__ import annotations

import argparse
import logging
import time

from flan_jax import data


def build_t0_mixture(cap: int) -> data.Mixture:
    tasks = []
    for path in sorted((data.data_dir() / "t0").glob("*.jsonl")):
        source = data.JsonlSource({"train": str(path)}, on_empty="warn")
        tasks.append(data.prompt_completion_task(f"bench_t0_{path.stem}", source, strip_suffix="<|endoftext|>"))
    return data.Mixture.proportional("bench_t0", tasks, cap=cap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--cap", type=int, default=3_000)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # the 11 empty T0 files are reported; not needed here

    start = time.perf_counter()
    mixture = build_t0_mixture(args.cap)
    rates = mixture.rates()  # loads and preprocesses every file
    stream = mixture.get_dataset("train", seed=0)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    chars = sum(len(e["inputs"]) + len(e["targets"]) for e in (stream[i] for i in range(args.examples)))
    render_s = time.perf_counter() - start
    print(f"tasks with examples: {len(rates)} of {len(mixture.tasks)}; load + preprocess: {load_s:.2f} s")
    print(
        f"rendered {args.examples:,} mixed examples in {render_s:.2f} s: "
        f"{args.examples / render_s:,.0f} examples/s, {chars / render_s / 1e6:.1f} M chars/s (one core)"
    )


if __name__ == "__main__":
    main()
