"""Scanned vs unrolled layers on this machine: compile time and training throughput of the trainer's step.

    python benchmarks/scan_layers.py                        # demo, 7m, 8- and 16-layer presets, float32
    python benchmarks/scan_layers.py --presets=demo --dtype=bfloat16 --remat=full --windows=5
    python benchmarks/scan_layers.py --presets=1b --dtype=bfloat16   # on a GPU (gpu_check.sh)

The measurement behind `config.model.scan_layers=None` (scan from `SCAN_MIN_LAYERS` layers on,
flan_jax/model/config.py). For each preset both layouts are built from the same seed with the
trainer's own pieces (`loop.build_model`, `step.make_train_step`), compiled (timed), then timed in
interleaved windows of `--steps` steps each (unrolled, scanned, unrolled, ...), so both sides see
the same machine load. Reported: compile s and the median tokens/s over the windows. Runs with
the launchers' malloc tunables, as the trainer does. On a GPU the attention is cuDNN's, as a
user there would pick (`model.attention="cudnn"`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from benchmarks.train_throughput import PRESETS as _THROUGHPUT  # noqa: E402  (the same model shapes)

PRESETS = {
    "demo": _THROUGHPUT["demo"],  # configs/demo.py's model and batch
    "7m": _THROUGHPUT["7m"],
    "8l": {**_THROUGHPUT["7m"], "n_layers": 8},
    "16l": {**_THROUGHPUT["7m"], "n_layers": 16},
    "1b": _THROUGHPUT["1b"],  # its GPU row; scanned by default there since 2026-12-01
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="demo,7m,8l,16l")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat", default="none", help="none|dots|full")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="interleaved windows per layout")
    args = parser.parse_args()
    from flan_jax import host_memory

    host_memory.reexec_with_tuned_malloc()  # as the trainer's launcher runs (flan_jax/host_memory.py)
    rows = []
    for preset in args.presets.split(","):
        rows.extend(measure(preset, args))
    print(f"{args.dtype} compute, remat {args.remat}")
    print(f"| preset | layers | layout | compile s | tokens/s (median of {args.windows} x {args.steps} steps) | scanned / unrolled |")
    print("|---|---:|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['preset']} | {row['n_layers']} | {row['layout']} | {row['compile_s']:.1f} | {row['tokens_per_s']:,.0f} "
              f"| {row.get('ratio', '')} |")


def measure(preset: str, args) -> list[dict]:
    import jax

    from flan_jax import default_config

    shape = dict(PRESETS[preset])
    batch_size, seq_len = shape.pop("batch"), shape.pop("seq_len")
    batch = common.random_batch(batch_size, seq_len, shape["vocab_size"])
    runs = {}
    for layout in ("unrolled", "scanned"):
        config = default_config.get_config()
        config.model.update(**shape, max_positions=seq_len, dtype=args.dtype, remat=args.remat,
                            scan_layers=layout == "scanned")
        config.data.seq_len, config.data.batch_size = seq_len, batch_size
        config.mesh.data = 1
        if jax.default_backend() == "gpu":
            config.model.attention = "cudnn"
        trainer = common.trainer_step(config)
        mesh, state, placed = trainer.mesh, trainer.state, trainer.place(batch)
        with jax.set_mesh(mesh):
            started = time.perf_counter()
            compiled = trainer.step.lower(state, placed).compile()
            compile_s = time.perf_counter() - started
            state, metrics = compiled(state, placed)
            jax.block_until_ready(metrics)
        runs[layout] = dict(mesh=mesh, compiled=compiled, state=state, batch=placed, compile_s=compile_s, rates=[],
                            n_layers=shape["n_layers"])
    for _ in range(args.windows):
        for layout, run in runs.items():
            with jax.set_mesh(run["mesh"]):
                started = time.perf_counter()
                for _ in range(args.steps):
                    run["state"], metrics = run["compiled"](run["state"], run["batch"])
                jax.block_until_ready(metrics)
                run["rates"].append(args.steps * batch_size * seq_len / (time.perf_counter() - started))
    rows = []
    for layout, run in runs.items():
        rows.append(dict(preset=preset, layout=layout, n_layers=run["n_layers"], compile_s=run["compile_s"],
                         tokens_per_s=statistics.median(run["rates"])))
    rows[1]["ratio"] = f"{rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x"
    return rows


if __name__ == "__main__":
    main()
