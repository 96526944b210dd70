"""Ahead-of-time fit check: compile the trainer's own step for pod-scale shapes on simulated devices.

    python benchmarks/aot_fit.py                                    # the default table (RESULTS.md)
    python benchmarks/aot_fit.py --shapes=llama3_8b --layouts=scanned,unrolled
    python benchmarks/aot_fit.py --shapes=llama3_70b --mesh=1,64,4 --remat=dots --json=out.json

Each row (a named shape in one layer layout) runs in its own process with as many simulated CPU
devices as its mesh needs (`--xla_force_host_platform_device_count`; the count is fixed when jax
starts) and calls `flan_jax.train.aot.compile_train_step`: the trainer's own jitted step, built
from its own pieces, lowered and compiled on abstract arrays. Columns:

  lower / compile s     wall time of `.lower()` and `.compile()` (the layer layout's main effect)
  state / device        bytes of params + optimizer state on ONE device, from the shardings (exact)
  largest leaf          the largest per-device piece of any state array ("replicated" lists any
                        unsharded array over 16 MiB: a large replicated leaf is a sharding bug)
  temp / device         XLA's temporary buffers as the CPU backend plans them (CPU and GPU
                        schedules differ, and XLA:CPU reports the same with and without remat:
                        activation memory cannot be judged here)
  all-gather etc.       collectives by dtype right after SPMD partitioning (what GSPMD moves; see
                        aot.py for why not the compiled CPU program); ops inside the layer scan's
                        body are counted once. "matrices" counts the rank >= 2 all-gathers only
                        (weights; f32 1-D ones are the norm scales, kept in float32 by design)
  AR->DS                all-reduces immediately sliced: the reduce-scatter pattern, which XLA:GPU's
                        ReduceScatterCreator turns into reduce-scatters (XLA:CPU has no such pass)
  remat warnings        "[SPMD] Involuntary full rematerialization" lines XLA printed

A row that runs past `--timeout` says so. Run it under the heavy lock on shared machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flan_jax.train import aot as aot_lib  # noqa: E402 (after the path; jax starts on first use only)

# Architectures (Llama family, untied head), batch and mesh (data, fsdp, tensor) per named shape.
SHAPES = {
    "tiny": dict(  # for tests: compiles in seconds
        model=dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128),
        seq_len=64, batch=8, mesh=(2, 2, 2), remat="none",
    ),
    "1b": dict(  # benchmarks/train_throughput.py --preset=1b (886M parameters)
        model=dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=5632),
        seq_len=2048, batch=64, mesh=(1, 8, 1), remat="none",
    ),
    "llama3_8b": dict(
        model=dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                   d_ff=14336, rope_theta=500000.0, max_positions=8192),
        seq_len=4096, batch=64, mesh=(8, 8, 1), remat="full",
    ),
    "llama3_70b": dict(
        model=dict(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128,
                   d_ff=28672, rope_theta=500000.0, max_positions=8192),
        seq_len=4096, batch=256, mesh=(1, 32, 8), remat="full",
    ),
    # FLAN-T5 at its published sizes: configs/flan_t5.py as a user runs it (its seq lens, batch,
    # optimizer and remat); the mesh is the 8-GPU one its docstring gives.
    "flan_t5_xl": dict(config=("flan_t5.py", "xl"), mesh=(1, 8, 1)),
    "flan_t5_xxl": dict(config=("flan_t5.py", "xxl"), mesh=(1, 8, 1)),
}
DEFAULT_ROWS = ("1b:scanned", "1b:unrolled", "llama3_8b:scanned", "llama3_8b:unrolled", "llama3_70b:scanned")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="shape:layout,... (layout: scanned|unrolled)")
    parser.add_argument("--shapes", default="", help="instead of --rows: these shapes ...")
    parser.add_argument("--layouts", default="scanned", help="... in these layouts")
    parser.add_argument("--mesh", default="", help="data,fsdp,tensor for every row (default: the shape's)")
    parser.add_argument("--remat", default="", help="none|dots|full for every row (default: the shape's)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (params and optimizer stay float32)")
    parser.add_argument("--attention", default="xla", help="config.model.attention (cudnn needs a GPU)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    parser.add_argument("--json", default="", help="also write the rows here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shape, layout = args.child.split(":")
        print("AOT_FIT_RESULT " + json.dumps(run_row(shape, layout, args)), flush=True)
        return

    rows = [f"{s}:{l}" for s in args.shapes.split(",") for l in args.layouts.split(",")] if args.shapes else args.rows.split(",")
    for row in rows:
        shape, _, layout = row.partition(":")
        if shape not in SHAPES or layout not in ("scanned", "unrolled"):
            sys.exit(f"bad row {row!r}: shapes {sorted(SHAPES)}, layouts scanned|unrolled")
    results = [run_child(row, args) for row in rows]
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


# ---------------------------------------------------------------------- parent
def run_child(row: str, args) -> dict:
    shape, layout = row.split(":")
    mesh = _mesh(shape, args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={math.prod(mesh)}".strip()
    command = [sys.executable, os.path.abspath(__file__), f"--child={row}"]
    for name in ("mesh", "remat", "dtype", "attention"):
        command.append(f"--{name}={getattr(args, name)}")
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: XLA may log a lot
        try:
            done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"shape": shape, "layout": layout, "mesh": mesh, "error": f"did not finish in {args.timeout:.0f} s"}
        stderr.seek(0)
        log = stderr.read()
    for line in done.stdout.splitlines():
        if line.startswith("AOT_FIT_RESULT "):
            result = json.loads(line[len("AOT_FIT_RESULT "):])
            result["child_wall_s"] = round(time.perf_counter() - started, 1)
            result["involuntary_remat"] = log.count(aot_lib.INVOLUNTARY_REMAT)
            return result
    return {"shape": shape, "layout": layout, "mesh": mesh, "error": log[-2000:]}


def _mesh(shape: str, args) -> tuple[int, int, int]:
    return _mesh_of(SHAPES[shape], args)


def _mesh_of(spec: dict, args) -> tuple[int, int, int]:
    return tuple(int(x) for x in args.mesh.split(",")) if args.mesh else spec["mesh"]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _collective_cell(counts: dict) -> str:
    return ", ".join(f"{dtype} x{n}" for dtype, n in sorted(counts.items())) or "0"


def markdown(results: list[dict]) -> str:
    lines = [
        "| shape | params | layers | mesh (data, fsdp, tensor) | remat | lower s | compile s "
        "| state / device GiB (params + opt) | largest leaf / device MiB | temp / device GiB (CPU plan) "
        "| all-gather (matrices) | all-reduce (AR->DS) | reduce-scatter | other | remat warnings |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|---|---|---|---:|",
    ]
    for r in results:
        if "error" in r:
            message = (r["error"].strip().splitlines() or ["failed"])[-1][:100]
            lines.append(f"| {r['shape']} | | {r['layout']} | {tuple(r['mesh'])} | | | {message} |" + " |" * 8)
            continue
        c = r["collectives"]
        other = {f"{k} {d}": n for k in ("all-to-all", "collective-permute") for d, n in c.get(k, {}).items()}
        largest = f"{r['largest_leaf_bytes_per_device'] / 2**20:.0f}"
        if r["replicated_large_leaves"]:
            largest += f" (replicated: {len(r['replicated_large_leaves'])})"
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e9:.2f}B | {r['layout']} | {tuple(r['mesh'])} | {r['remat']} "
            f"| {r['lower_s']:.1f} | {r['compile_s']:.1f} "
            f"| {_gib(r['state_bytes_per_device'])} ({_gib(r['param_bytes_per_device'])} + {_gib(r['opt_bytes_per_device'])}) "
            f"| {largest} | {_gib(r['temp_bytes']) if r['temp_bytes'] is not None else 'n/a'} "
            f"| {_collective_cell(c.get('all-gather', {}))} ({_collective_cell(r['all_gathered_matrix_dtypes'])}) "
            f"| {_collective_cell(c.get('all-reduce', {}))} ({r['all_reduce_then_slice']}) "
            f"| {_collective_cell(c.get('reduce-scatter', {}))} | {_collective_cell(other)} | {r['involuntary_remat']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- child
def aot_config(shape: str, layout: str, args):
    from flan_jax import default_config

    spec = SHAPES[shape]
    if "config" in spec:
        return _config_file_row(spec, layout, args)
    config = default_config.get_config()
    config.model.family = "llama"
    for key, value in spec["model"].items():
        config.model[key] = value
    config.model.scan_layers = layout == "scanned"
    config.model.remat = args.remat or spec["remat"]
    config.model.dtype = args.dtype
    config.model.attention = args.attention
    config.data.seq_len = spec["seq_len"]
    config.data.batch_size = spec["batch"]
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = _mesh(shape, args)
    config.train.num_steps = 1000
    return config


def _config_file_row(spec: dict, layout: str, args):
    """A shape given by one of configs/ (file, argument), with the row's mesh and any --remat/--dtype."""
    import importlib.util

    filename, argument = spec["config"]
    loader = importlib.util.spec_from_file_location("aot_row_config", os.path.join(ROOT, "configs", filename))
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    config = module.get_config(argument)
    if args.remat:
        config.model.remat = args.remat
    config.model.scan_layers = layout == "scanned"
    config.model.dtype = args.dtype
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = _mesh_of(spec, args)
    return config


def run_row(shape: str, layout: str, args) -> dict:
    config = aot_config(shape, layout, args)
    started = time.perf_counter()
    report = aot_lib.compile_train_step(config)
    from flan_jax.model import registry

    return {
        "shape": shape,
        "layout": layout,
        "mesh": [int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor)],
        "remat": config.model.remat,
        "dtype": config.model.dtype,
        "seq_len": int(config.data.seq_len),
        "targets_len": int(config.data.get("targets_len", 0) or 0),
        "batch": int(config.data.batch_size),
        "params": registry.config_from(config.model).num_params,
        "total_s": round(time.perf_counter() - started, 1),
        "lower_s": round(report.lower_s, 1),
        "compile_s": round(report.compile_s, 1),
        "param_bytes_per_device": report.param_bytes_per_device,
        "opt_bytes_per_device": report.opt_bytes_per_device,
        "state_bytes_per_device": report.state_bytes_per_device,
        "largest_leaf_bytes_per_device": report.largest_leaf_bytes_per_device,
        "replicated_large_leaves": report.replicated_large_leaves,
        "temp_bytes": report.temp_bytes,
        "collectives": report.collectives,
        "all_gathered_matrix_dtypes": report.all_gathered_matrix_dtypes,
        "all_reduce_then_slice": report.all_reduces_then_sliced,
    }


if __name__ == "__main__":
    main()
