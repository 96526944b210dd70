"""On one accelerator: peak memory per remat policy, the largest model that trains, and its MFU.

    python benchmarks/gpu_memory.py                         # 1B at seq 4096: remat none / dots / full
    python benchmarks/gpu_memory.py --largest               # the largest preset that trains (remat full)
    python benchmarks/gpu_memory.py --tiny                  # CPU smoke run of both (no peak memory on CPU)

Each row runs in its own process, so `peak_bytes_in_use` is that row's peak: the trainer's own
jitted step (`loop.build_model`, `state.init_state`, `step.make_train_step`; bf16 compute,
float32 params and AdamW, scanned layers, cuDNN attention on GPUs) runs `--warmup` + `--steps`
steps on random tokens. A row that runs out of memory reports it. MFU uses the trainer's FLOP
count (`metrics.flops_per_token`) and peak table (`metrics.peak_flops`), as metrics.jsonl does.
`--largest` tries the presets from the biggest down and stops at the first that trains.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import common  # noqa: E402

# Llama shapes (untied head); batch rows per step.
PRESETS = {
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128),
    "1b": dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=5632),
    "3b": dict(vocab_size=128256, d_model=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, d_ff=8192),
    "8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336),
    "13b": dict(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, head_dim=128, d_ff=13824),
}
LARGEST_FIRST = ("13b", "8b", "3b", "1b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1b:none,1b:dots,1b:full", help="preset:remat,...")
    parser.add_argument("--largest", action="store_true", help="instead: the largest preset that trains")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per row")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny preset, short rows")
    parser.add_argument("--json", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        preset, remat = args.child.split(":")
        print("GPU_MEMORY_RESULT " + json.dumps(run_row(preset, remat, args)), flush=True)
        return
    if args.tiny:
        args.seq_len, args.batch, args.steps, args.warmup = 64, 2, 1, 1
    if args.largest:
        results = []
        for preset in (("tiny",) if args.tiny else LARGEST_FIRST):
            results.append(run_child(f"{preset}:full", args))
            if "error" not in results[-1]:
                break
    else:
        rows = ["tiny:none", "tiny:dots", "tiny:full"] if args.tiny else args.rows.split(",")
        results = [run_child(row, args) for row in rows]
    print("| preset | params | remat | seq x batch | peak memory GiB | tokens/s | MFU | note |")
    print("|---|---:|---|---|---:|---:|---:|---|")
    for r in results:
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        tokens = f"{r['tokens_per_sec']:,.0f}" if r.get("tokens_per_sec") else ""
        print(f"| {r['preset']} | {r.get('params', 0) / 1e9:.2f}B | {r['remat']} | {args.seq_len} x {args.batch} "
              f"| {peak} | {tokens} | {mfu} | {r.get('error', '')[:80]} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def run_child(row: str, args) -> dict:
    preset, remat = row.split(":")
    command = [sys.executable, os.path.abspath(__file__), f"--child={row}", f"--seq_len={args.seq_len}",
               f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"preset": preset, "remat": remat, "error": f"did not finish in {args.timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("GPU_MEMORY_RESULT "):
            return json.loads(line[len("GPU_MEMORY_RESULT "):])
    tail = done.stderr.strip().splitlines()
    out_of_memory = any("RESOURCE_EXHAUSTED" in line or "out of memory" in line.lower() for line in tail)
    return {"preset": preset, "remat": remat, "error": "out of memory" if out_of_memory else (tail or ["failed"])[-1]}


def run_row(preset: str, remat: str, args) -> dict:
    import jax

    from flan_jax import default_config
    from flan_jax.train import metrics

    on_gpu = jax.devices()[0].platform == "gpu"
    config = default_config.get_config()
    config.model.update(**PRESETS[preset], max_positions=args.seq_len, dtype="bfloat16", remat=remat,
                        scan_layers=True, attention="cudnn" if on_gpu else "xla")
    config.data.seq_len, config.data.batch_size = args.seq_len, args.batch
    config.mesh.data = 1
    trainer = common.trainer_step(config)
    mesh, model_cfg, parts, state, train_step = trainer.mesh, trainer.model_cfg, trainer.parts, trainer.state, trainer.step
    batch = trainer.place(common.random_batch(args.batch, args.seq_len, model_cfg.vocab_size))
    with jax.set_mesh(mesh):
        for _ in range(args.warmup):
            state, out = train_step(state, batch)
        jax.block_until_ready(out)
        started = time.perf_counter()
        for _ in range(args.steps):
            state, out = train_step(state, batch)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - started
    tokens_per_sec = args.steps * args.batch * args.seq_len / elapsed
    n_matmul = metrics.matmul_param_count(parts.abstract_params, parts.logical_axes, tied_embeddings=model_cfg.tie_embeddings)
    flops = metrics.flops_per_token(model_cfg, n_matmul, args.seq_len) * tokens_per_sec
    peak = metrics.peak_flops(0.0, "bfloat16") if on_gpu else None
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "preset": preset, "remat": remat, "params": model_cfg.num_params, "device": jax.devices()[0].device_kind,
        "peak_bytes": stats.get("peak_bytes_in_use"), "tokens_per_sec": tokens_per_sec,
        "mfu": flops / peak if peak else None, "loss": float(out["loss"]),
    }


if __name__ == "__main__":
    main()
