"""One projection's forward + backward, full fine-tuning against LoRA, for each projection shape
of a model: where a LoRA step's time goes, without the rest of the step around it.

    python benchmarks/lora_projection.py --preset=1b --dtype=bfloat16          # on a GPU (gpu_check.sh)
    python benchmarks/lora_projection.py --preset=smollm2_135m --tokens=1024   # CPU
    python benchmarks/lora_projection.py --tiny                                # seconds: every row runs

Variants, each `jax.vjp` of y = f(x, ...) with a random cotangent, jitted:
  * full       y = x W, gradients for x and W (full fine-tuning's projection; the trainer's
               `dense_dot` with the kernels this backend resolves to)
  * frozen     the same, gradient for x only: the floor for any adapter (no weight gradient)
  * merged     `lora_dense_dot` (what flan_jax's LoRA layers run): y = x (W + s A B), gradients
               for x, A and B
  * unmerged   y = x W + s (x A) B by autodiff, W frozen: PEFT's formulation, the alternative
The shapes are the preset's q, k, v, o, gate, up and down kernels (heads flattened), with `--tokens`
rows (default: the preset's batch x length). "layer" sums the seven. A LoRA step with
adapters on every projection costs about `merged / full` of full fine-tuning's time in these
matmuls; `merged / frozen` is what the adapters add over a frozen projection.

The adapters' backward reads the projection's input x and output gradient g twice more each
(g B^T, x^T (g B^T); x A, (x A)^T g): memory-bound rank-r products. "adapter GB/s" is those
2 T (in + out) elements in the compute dtype over the time merged adds to frozen: near the
device's memory bandwidth, the rank-r products run as fast as they can and the remaining cost is
intrinsic to training adapters; far below it, they are where to look.

Times: the median over `--repeats` of `--iters` back-to-back calls (one device sync per repeat),
after a warm-up call. Prints a Markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.lora_memory import PRESETS  # noqa: E402  (the same model shapes)

VARIANTS = ("full", "frozen", "merged", "unmerged")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, default=0, help="rows of x (default: the preset's batch x seq_len)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--frozen_dtype", default="float32", choices=("float32", "bfloat16"), help="dtype W is held in")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="--preset=tiny --iters=2 --repeats=1")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.iters, args.repeats = "tiny", 2, 1
    return args


def projection_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection kernel, heads flattened."""
    d, hd = shape["d_model"], shape["head_dim"]
    q, kv = shape["n_heads"] * hd, shape["n_kv_heads"] * hd
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d),
            "gate": (d, shape["d_ff"]), "up": (d, shape["d_ff"]), "down": (shape["d_ff"], d)}


def variant_fn(variant: str, *, dtype, impl: str, scale: float):
    """(forward of (x, w, a, b), the names of the arguments it is differentiated by) for one variant."""
    import jax.numpy as jnp

    from flan_jax.model.kernels.matmul import dense_dot, lora_dense_dot

    if variant in ("full", "frozen"):
        return (lambda x, w, a, b: dense_dot(x, w, 1, dtype, impl)), ("x", "w") if variant == "full" else ("x",)
    if variant == "merged":
        return (lambda x, w, a, b: lora_dense_dot(x, w, a, b, scale, 1, dtype)), ("x", "a", "b")

    def unmerged(x, w, a, b):
        xa = dense_dot(x, a, 1, dtype, impl)
        return (dense_dot(x, w, 1, dtype, impl) + jnp.asarray(scale, dtype) * dense_dot(xa, b, 1, dtype, impl)).astype(dtype)

    return unmerged, ("x", "a", "b")


def token_count(args) -> int:
    return args.tokens or PRESETS[args.preset]["batch"] * PRESETS[args.preset]["seq_len"]


def time_variant(variant: str, in_out: tuple[int, int], args) -> float:
    """Seconds per forward + backward call of `variant` on one projection."""
    import jax
    import jax.numpy as jnp

    from flan_jax.model import kernels

    n_in, n_out = in_out
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 5)
    tokens = token_count(args)
    inputs = {
        "x": jax.random.normal(keys[0], (tokens, n_in), dtype),
        "w": (jax.random.normal(keys[1], (n_in, n_out)) * 0.02).astype(args.frozen_dtype if variant != "full" else jnp.float32),
        "a": jax.random.normal(keys[2], (n_in, args.rank)) * 0.02,
        "b": jax.random.normal(keys[3], (args.rank, n_out)) * 0.02,  # not zero: the values must not be trivial
    }
    cotangent = jax.random.normal(keys[4], (tokens, n_out), dtype)
    forward, wrt = variant_fn(variant, dtype=dtype, impl=kernels.resolve("auto"), scale=2.0)

    @jax.jit
    def forward_backward(values, g):
        def differentiated(*diff):
            return forward(**{**values, **dict(zip(wrt, diff))})

        y, vjp = jax.vjp(differentiated, *(values[name] for name in wrt))
        return y, vjp(g)

    jax.block_until_ready(forward_backward(inputs, cotangent))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.iters):
            out = forward_backward(inputs, cotangent)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / args.iters)
    return statistics.median(times)


def _bandwidth(row: dict) -> str:
    added = row["merged"] - row["frozen"]
    return f"{row['adapter_bytes'] / added / 1e9:,.0f}" if added > 0 else "-"


def main() -> None:
    args = parse_args()
    import jax

    shapes = projection_shapes(PRESETS[args.preset])
    rows = []
    for name, in_out in shapes.items():
        row = {"projection": name, "in": in_out[0], "out": in_out[1]}
        for variant in VARIANTS:
            row[variant] = time_variant(variant, in_out, args)
        rows.append(row)
    tokens = token_count(args)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    for row in rows:
        row["adapter_bytes"] = 2 * tokens * (row["in"] + row["out"]) * itemsize
    rows.append({"projection": "layer", "in": None, "out": None, "adapter_bytes": sum(r["adapter_bytes"] for r in rows),
                 **{v: sum(r[v] for r in rows) for v in VARIANTS}})
    print(f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}); {args.preset}, {tokens} tokens, {args.dtype} "
          f"compute, W in {args.frozen_dtype} (full: float32), r={args.rank}; median of {args.repeats} x {args.iters} calls")
    print("\n| projection | in x out | full (ms) | frozen (ms) | merged (ms) | unmerged (ms) | merged / full | "
          "merged / frozen | unmerged / merged | adapter GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dims = f"{r['in']} x {r['out']}" if r["in"] else "-"
        print(f"| {r['projection']} | {dims} | {r['full'] * 1e3:.3f} | {r['frozen'] * 1e3:.3f} | {r['merged'] * 1e3:.3f} | "
              f"{r['unmerged'] * 1e3:.3f} | {r['merged'] / r['full']:.2f}x | {r['merged'] / r['frozen']:.2f}x | "
              f"{r['unmerged'] / r['merged']:.2f}x | {_bandwidth(r)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args), "device": jax.devices()[0].device_kind}, f, indent=2)


if __name__ == "__main__":
    main()
