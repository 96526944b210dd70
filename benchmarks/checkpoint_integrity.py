"""What the checkpoint checksums cost: hashing time against Orbax's own save and restore, same run.

    python benchmarks/checkpoint_integrity.py                  # the demo model (configs/demo.py) and the 7m preset
    python benchmarks/checkpoint_integrity.py --presets=demo --repeats=3

For each model: the trainer's state (params + AdamW moments + step/RNG/counters) and a data iterator
are saved `--repeats` times through `flan_jax.train.checkpointing.Checkpointer` (synchronous saves,
so the whole save is timed), then restored with `restore_latest` as a resume does. The time inside
`integrity.write_manifest` (SHA-256 of every file written) and `integrity.verify` is measured
separately from the rest, which is Orbax's. Medians are reported; the overhead is hashing time
over Orbax's time. The files were just written, so they are read from the page cache, as they are
when the trainer checksums a save it just made.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

PRESETS = {
    "demo": dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384),
    "7m": dict(vocab_size=8000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=768),
}


def measure(preset: str, repeats: int) -> dict:
    import grain
    import jax
    import numpy as np
    from flax import nnx

    from flan_jax import default_config, model as model_lib
    from flan_jax.train import checkpointing, integrity, optimizer, partitioning, state as state_lib

    config = default_config.get_config()
    config.model.update(**PRESETS[preset])
    config.checkpoint.update(async_save=False, keep=repeats + 1)
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    rules = partitioning.axis_rules(config.mesh)
    cfg = model_lib.ModelConfig.from_config(config.model)
    parts = state_lib.ModelParts(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    tx, _ = optimizer.make_optimizer(config.optimizer, 1000)
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    abstract = state_lib.abstract_state(parts, tx, shardings, 0)

    def iterator():
        return iter(grain.MapDataset.range(10_000).map(lambda i: {"x": np.full((2,), i)}).to_iter_dataset())

    hashing = {"write": [], "verify": []}
    write, verify = integrity.write_manifest, integrity.verify

    def timed(kind, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                hashing[kind].append(time.perf_counter() - start)
        return wrapper

    integrity.write_manifest, integrity.verify = timed("write", write), timed("verify", verify)
    saves, restores = [], []
    try:
        with tempfile.TemporaryDirectory() as workdir:
            ckpt = checkpointing.Checkpointer(workdir, config.checkpoint)
            it = iterator()
            for s in range(1, repeats + 1):
                start = time.perf_counter()
                ckpt.save(s, state, it, config)
                ckpt.wait()
                saves.append(time.perf_counter() - start)
            ckpt.close()
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(workdir, "checkpoints", "1")) for f in fs)
            for _ in range(repeats):
                hashing["verify"].clear()
                start = time.perf_counter()
                restored = checkpointing.Checkpointer(workdir, config.checkpoint).restore_latest(abstract, iterator())
                jax.block_until_ready(restored)
                restores.append((time.perf_counter() - start, sum(hashing["verify"])))
    finally:
        integrity.write_manifest, integrity.verify = write, verify
    save_hash = statistics.median(hashing["write"])
    save_total = statistics.median(saves)
    restore_total = statistics.median(t for t, _ in restores)
    restore_hash = statistics.median(h for _, h in restores)
    return {
        "preset": preset, "params": cfg.num_params, "bytes": size,
        "save_orbax": save_total - save_hash, "save_hash": save_hash,
        "restore_orbax": restore_total - restore_hash, "restore_hash": restore_hash,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="demo,7m")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = [measure(p, args.repeats) for p in args.presets.split(",")]
    print("| model | params | checkpoint MB | Orbax save s | checksums s | overhead | Orbax restore s | verify s | overhead |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['params']:,} | {r['bytes'] / 2**20:.1f} | {r['save_orbax']:.3f} | {r['save_hash']:.4f} | "
              f"{100 * r['save_hash'] / r['save_orbax']:.1f}% | {r['restore_orbax']:.3f} | {r['restore_hash']:.4f} | "
              f"{100 * r['restore_hash'] / r['restore_orbax']:.1f}% |")


if __name__ == "__main__":
    main()
