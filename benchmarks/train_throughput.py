"""Training throughput of the flan_jax train step vs transformers + torch, and vs a dense matmul.

    python benchmarks/train_throughput.py                 # ~7M Llama, batch 8 x 512, CPU (takes minutes)
    python benchmarks/train_throughput.py --tiny          # seconds: checks that everything runs
    python benchmarks/train_throughput.py --preset=1b --variants=bf16 --devices=1   # on a GPU

What is measured, in one run on the same machine:
  * ceiling   the best dense matmul FLOP/s of jax and torch here, per compute dtype (bfloat16 with
              float32 accumulation, as training uses it)
  * flan_jax  `flan_jax.train.step.make_train_step` (the trainer's own jitted step: AdamW, clipping,
              loss, sharding) on the real `flan_jax.model.Transformer`, for each variant:
              fp32 = float32 params and compute; bf16 = float32 params, bfloat16 compute
              (matmuls in bf16, logits and loss in float32), each on 1 device and, with
              --devices=2, data-parallel over 2 simulated CPU devices (XLA splits the work
              into two partitions; on a 2-core CPU that helps its thread use)
  * torch     `transformers.LlamaForCausalLM` + `torch.optim.AdamW`, same architecture and batch, for
              each variant: fp32, and bf16 = float32 params under `torch.autocast(bfloat16)`;
              on the GPU when jax has one (SDPA attention, fused AdamW), in a child process.

Each row is compared with the ceiling and the torch row of its own compute dtype, and with torch fp32.
With --grad_accum=N both sides run each step as N micro-batches with summed gradients (flan_jax:
`optimizer.grad_accum_steps`; torch: N forward/backward passes before the update). On this CPU one
pass is the fastest for both since the malloc reuse tunables below (benchmarks/RESULTS.md, run 22).

Environment: the script re-runs itself with the glibc malloc tunables the flan_jax launchers use
when opted in (flan_jax/host_memory.py: freed memory reused, large blocks on huge pages; the
benchmark opts in for both sides, `FLAN_JAX_TUNED_MALLOC=0` turns them off), and measures the
torch rows in a child process with the reuse tunables but without huge pages, torch's fastest
setting on this CPU.

Steps are timed after `--warmup` steps (compilation) in `--windows` windows of `--steps` steps, each
with one host sync at its end as the trainer does between log steps; every row reports its fastest
window (this machine drifts 10-20% between runs, so one short window is mostly noise). Model FLOPs use the formula of
flan_jax/train/metrics.py (6 x matmul params + attention, per token), the same for both.
Prints a Markdown table (paste it into benchmarks/RESULTS.md) and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

PRESETS = {
    # The configuration: ~7M parameters.
    "7m": dict(vocab_size=8000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=768, batch=8, seq_len=512),
    # The model and batch of configs/demo.py (what `make demo` trains).
    "demo": dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384, batch=32, seq_len=256),
    # A ~1B Llama (TinyLlama-like widths) for accelerators.
    "1b": dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=5632, batch=8, seq_len=2048),
    # Seconds on CPU: only checks that every path runs.
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=32, d_ff=128, batch=4, seq_len=64),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7m")
    parser.add_argument("--tiny", action="store_true", help="same as --preset=tiny --steps=2 --warmup=1 --windows=1")
    parser.add_argument("--variants", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--devices", type=int, default=2, help="also run data-parallel over this many devices (1: off)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per window")
    parser.add_argument("--windows", type=int, default=3,
                        help="timed windows per row; the fastest counts (the same rule for every row)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                        help="auto: cuDNN's fused kernel on NVIDIA GPUs, the causal block path elsewhere")
    parser.add_argument("--remat", choices=("none", "dots", "full"), default="none")
    parser.add_argument("--kernels", default="auto",
                        help="comma list of config.model.kernels (auto, cpu, xla): one flan_jax row per choice")
    parser.add_argument("--grad_accum", type=int, default=1,
                        help="split every step's batch into this many micro-batches, for flan_jax "
                             "(optimizer.grad_accum_steps) and torch alike")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    # Internal: the torch child process writes its rows there, measured on that device.
    parser.add_argument("--torch_rows_to", default="", help=argparse.SUPPRESS)
    parser.add_argument("--torch_device", default="cpu", choices=("cpu", "cuda"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.preset, args.steps, args.warmup, args.windows = "tiny", 2, 1, 1
    return args


def main() -> None:
    args = parse_args()
    from flan_jax import host_memory

    if args.torch_rows_to:
        return write_torch_rows(args)
    # The flan_jax rows run as `python -m flan_jax.train` would: with its glibc malloc tunables
    # (flan_jax/host_memory.py). The torch rows run in a child process with the reuse tunables
    # but without huge pages, torch's fastest setting on this CPU: each side gets its best.
    host_memory.reexec_with_tuned_malloc(default=True)
    on_cpu = not os.environ.get("JAX_PLATFORMS", "").startswith(("cuda", "gpu", "tpu"))
    if on_cpu and args.devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"

    # On a GPU torch and jax share its memory: jax takes it as needed instead of 75% up front,
    # and the torch child runs (and exits) before the flan_jax rows.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    shape = PRESETS[args.preset]
    for n in {1, args.devices}:
        if shape["batch"] % (args.grad_accum * n):
            sys.exit(f"--grad_accum={args.grad_accum}: the {args.preset} batch of {shape['batch']} rows does not "
                     f"split into {args.grad_accum} micro-batches on {n} device(s)")
    rows = []
    ceiling = matmul_ceiling(jax)
    if not args.skip_torch:
        torch_device = "cpu" if jax.default_backend() == "cpu" else "cuda"
        torch_environ = host_memory.environ_without(dict(os.environ), (host_memory.HUGE_PAGES,))
        rows.extend(torch_rows_in_child(args, torch_device, host_memory.environ_with(torch_environ, host_memory.REUSE_TUNABLES)))
    for variant in args.variants.split(","):
        device_counts = [1] + ([args.devices] if args.devices > 1 and len(jax.devices()) >= args.devices else [])
        for n in device_counts:
            for kernel_choice in args.kernels.split(","):
                rows.append(run_flan_jax(shape, variant, n, **_timing(args), attention=args.attention, remat=args.remat,
                                         grad_accum=args.grad_accum, kernels=kernel_choice))
    rows.sort(key=lambda r: r["name"].startswith("transformers"))  # flan_jax rows first
    report(rows, ceiling, shape, args)


def torch_rows_in_child(args: argparse.Namespace, device: str, environ: dict[str, str]) -> list[dict]:
    """The torch rows, measured by this script on `device` in a child process with `environ`."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch_rows.json")
        command = [sys.executable, os.path.abspath(__file__), f"--preset={args.preset}", f"--variants={args.variants}",
                   f"--steps={args.steps}", f"--warmup={args.warmup}", f"--windows={args.windows}",
                   f"--grad_accum={args.grad_accum}",
                   f"--torch_rows_to={out}", f"--torch_device={device}"]
        subprocess.run(command, env=environ, check=True)
        with open(out) as f:
            return json.load(f)


def write_torch_rows(args: argparse.Namespace) -> None:
    """In the child: measure torch on `--torch_device` and write the rows as JSON."""
    rows = [
        run_torch(PRESETS[args.preset], v, **_timing(args), on_cpu=args.torch_device == "cpu", grad_accum=args.grad_accum)
        for v in args.variants.split(",")
    ]
    with open(args.torch_rows_to, "w") as f:
        json.dump(rows, f)


def matmul_ceiling(jax) -> dict[str, float]:
    """Best dense matmul FLOP/s of jax and torch (when installed) on this machine, per compute dtype.

    bfloat16 is measured the way training uses it: bf16 operands accumulated into float32
    (`preferred_element_type`), which runs on the bf16 dot-product units; a matmul with a bf16
    *output* takes a slower path on XLA's CPU backend and is listed separately for reference.
    Random operands: zeros or ones can run faster than real data on GPUs.
    """
    import jax.numpy as jnp
    import numpy as np

    on_cpu = jax.default_backend() == "cpu"
    size = 2048 if on_cpu else 8192
    flops = 2 * size**3
    out = {}
    host = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    a32, a16 = jnp.asarray(host), jnp.asarray(host, jnp.bfloat16)
    matmul = jax.jit(lambda x: x @ x)
    accumulate32 = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    out["jax_float32"] = _best_flops(lambda: matmul(a32).block_until_ready(), flops)
    out["jax_bfloat16"] = _best_flops(lambda: accumulate32(a16).block_until_ready(), flops)
    out["jax_bfloat16_out"] = _best_flops(lambda: matmul(a16).block_until_ready(), flops)
    try:
        import torch

        device = _torch_device(torch, on_cpu)
        torch.set_num_threads(os.cpu_count() or 1)
        t32 = torch.from_numpy(host).to(device)
        t16 = t32.to(torch.bfloat16)
        out["torch_float32"] = _best_flops(lambda: _torch_sync(torch, t32 @ t32), flops)
        out["torch_bfloat16"] = _best_flops(lambda: _torch_sync(torch, t16 @ t16), flops)
    except ImportError:
        pass
    for dtype in ("float32", "bfloat16"):
        out[dtype] = max(v for k, v in out.items() if k.endswith(dtype))
    return out


def _torch_device(torch, on_cpu: bool) -> str:
    """torch runs where jax runs: on the GPU when jax has one (and torch sees it)."""
    return "cuda" if not on_cpu and torch.cuda.is_available() else "cpu"


def _torch_sync(torch, result=None):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result


def _best_flops(fn, flops: float, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best


def _config(shape: dict, variant: str, attention: str = "auto", remat: str = "none", grad_accum: int = 1,
            kernels: str = "auto"):
    """The trainer's config for this shape; by default the attention kernel a user would pick here."""
    import jax

    from flan_jax import default_config

    config = default_config.get_config()
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
        config.model[key] = shape[key]
    config.model.max_positions = shape["seq_len"]
    config.model.dtype = {"fp32": "float32", "bf16": "bfloat16"}[variant]
    # cuDNN's fused attention on NVIDIA GPUs (default_config.py); the causal block path elsewhere.
    if attention == "auto":
        attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
    config.model.attention = attention
    config.model.remat = remat
    config.model.kernels = kernels
    config.data.batch_size, config.data.seq_len = shape["batch"], shape["seq_len"]
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_accum_steps = grad_accum
    return config


def _timing(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "warmup": args.warmup, "windows": args.windows}


def run_flan_jax(
    shape: dict, variant: str, n_devices: int, *, steps: int = 10, warmup: int = 2, windows: int = 3,
    attention: str = "auto", remat: str = "none", grad_accum: int = 1, kernels: str = "auto",
) -> dict:
    """Tokens/s of the trainer's jitted step (params, optimizer state and batch sharded as in training)."""
    import jax

    from flan_jax.model import kernels as kernels_lib
    from flan_jax.train import metrics

    config = _config(shape, variant, attention, remat, grad_accum, kernels)
    trainer = common.trainer_step(config, n_devices)
    mesh, model_cfg, parts, state, train_step = trainer.mesh, trainer.model_cfg, trainer.parts, trainer.state, trainer.step
    batch = trainer.place(common.random_batch(shape["batch"], shape["seq_len"], shape["vocab_size"]))
    with jax.set_mesh(mesh):
        for _ in range(warmup):
            state, m = train_step(state, batch)
        jax.block_until_ready(m)
        elapsed = float("inf")
        for _ in range(windows):
            start = time.perf_counter()
            for _ in range(steps):
                state, m = train_step(state, batch)
            loss = float(m["loss"])  # the one host sync per window
            elapsed = min(elapsed, time.perf_counter() - start)
    n_matmul = metrics.matmul_param_count(parts.abstract_params, parts.logical_axes, tied_embeddings=model_cfg.tie_embeddings)
    per_token = metrics.flops_per_token(model_cfg, n_matmul, shape["seq_len"])
    n_params = sum(int(p.size) for p in jax.tree.leaves(parts.abstract_params))
    tokens_per_sec = steps * shape["batch"] * shape["seq_len"] / elapsed
    return {
        "name": "flan_jax train step",
        "variant": variant,
        "dtype": {"fp32": "float32", "bf16": "bf16 compute / fp32 params"}[variant],
        "attention": config.model.attention,
        "remat": config.model.remat,
        "kernels": kernels_lib.resolve(config.model.kernels),
        "grad_accum": grad_accum,
        "devices": n_devices,
        "tokens_per_sec": tokens_per_sec,
        "flops_per_sec": tokens_per_sec * per_token,
        "flops_per_token": per_token,
        "params": n_params,
        "final_loss": loss,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def run_torch(
    shape: dict, variant: str, *, steps: int = 10, warmup: int = 2, windows: int = 3, on_cpu: bool = True,
    grad_accum: int = 1,
) -> dict:
    """Tokens/s of transformers' Llama + torch AdamW; bf16 = float32 params under bf16 autocast.

    With `grad_accum` > 1 each step runs that many forward/backward passes over equal slices of
    the batch, each loss divided by `grad_accum` (the full batch's mean loss), then one update.

    On a GPU: the same on CUDA, with torch's SDPA attention (flash/cuDNN kernels) and fused AdamW.
    """
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    device = _torch_device(torch, on_cpu)
    hf_config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["d_model"],
        intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=shape["seq_len"],
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_config).to(device)
    model.train()
    fused = {"fused": True} if device == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, **fused)
    batch = common.random_batch(shape["batch"], shape["seq_len"], shape["vocab_size"])
    inputs = torch.from_numpy(batch["input_tokens"]).long().to(device)
    labels = torch.from_numpy(batch["target_tokens"]).long().to(device)

    def compute_context():
        if variant == "bf16":
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    rows_per_pass = shape["batch"] // grad_accum

    def one_step():
        total = 0.0
        for i in range(grad_accum):
            rows = slice(i * rows_per_pass, (i + 1) * rows_per_pass)
            with compute_context():
                logits = model(input_ids=inputs[rows]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[rows].reshape(-1))
            (loss / grad_accum).backward()
            total = total + loss.detach() / grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    for _ in range(warmup):
        one_step()
    _torch_sync(torch)
    elapsed = float("inf")
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            loss = one_step()
        loss = float(loss.detach())  # the one host sync per window, as in the jax loop
        elapsed = min(elapsed, time.perf_counter() - start)
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_sec = steps * shape["batch"] * shape["seq_len"] / elapsed
    return {
        "name": "transformers + torch AdamW",
        "variant": variant,
        "dtype": {"fp32": "float32", "bf16": "bf16 autocast / fp32 params"}[variant],
        "devices": 1,
        "grad_accum": grad_accum,
        "tokens_per_sec": tokens_per_sec,
        "params": n_params,
        "final_loss": loss,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def report(rows: list[dict], ceiling: dict, shape: dict, args) -> None:
    """Markdown table; percentages use the ceiling of the row's compute dtype, ratios torch's rows."""
    import jax

    from flan_jax.train import metrics

    per_token = next(r["flops_per_token"] for r in rows if "flops_per_token" in r)
    torch_rates = {r["variant"]: r["tokens_per_sec"] for r in rows if r["name"].startswith("transformers")}
    for r in rows:
        r.setdefault("flops_per_sec", r["tokens_per_sec"] * per_token)
    ceilings = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in ceiling.items() if k.startswith(("jax_", "torch_")))
    device = jax.devices()[0]
    # MFU in the usual sense: against the accelerator's datasheet bf16 peak (metrics.py's table).
    datasheet_peak = metrics.peak_flops(0, "bfloat16") if device.platform != "cpu" else None
    print(
        f"\n{device.device_kind} ({device.platform}), jax {jax.__version__}"
        + (f", datasheet bf16 peak {datasheet_peak / 1e12:.0f} TFLOP/s per device" if datasheet_peak else "")
    )
    from flan_jax import host_memory

    if host_memory.tuned():
        print(
            f"flan_jax rows with GLIBC_TUNABLES={':'.join(host_memory.TUNABLES)} (as the flan_jax launchers run with FLAN_JAX_TUNED_MALLOC=1); "
            f"torch rows in a child process without {host_memory.HUGE_PAGES} (torch's faster setting on CPU)"
        )
    print(
        f"{args.preset} Llama ({rows[0]['params'] / 1e6:.1f}M params), batch {shape['batch']} x {shape['seq_len']}, "
        f"{per_token / 1e6:.1f} MFLOP/token; the fastest of {args.windows} windows of {args.steps} timed steps, "
        f"after {args.warmup} warm-up steps"
        + (f"; every step as {args.grad_accum} micro-batches (gradient accumulation, both sides)" if args.grad_accum > 1 else "")
        + "\n"
        f"dense matmul ceiling here (GFLOP/s): float32 {ceiling['float32'] / 1e9:.0f}, "
        f"bfloat16 with float32 accumulation {ceiling['bfloat16'] / 1e9:.0f} ({ceilings})\n"
    )
    print(
        "| implementation | dtype | devices | tokens/s | model GFLOP/s | % of same-dtype ceiling "
        "| % of fp32 ceiling | vs torch, same dtype | vs torch fp32 | MFU (bf16 datasheet peak) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dtype_ceiling = ceiling["bfloat16" if r["variant"] == "bf16" else "float32"]
        vs_same, vs_fp32 = (
            f"{r['tokens_per_sec'] / torch_rates[v]:.2f}x" if v in torch_rates else "n/a" for v in (r["variant"], "fp32")
        )
        mfu = "n/a"
        if datasheet_peak and r["variant"] == "bf16":
            r["mfu"] = r["flops_per_sec"] / (datasheet_peak / len(jax.devices()) * r["devices"])
            mfu = f"{100 * r['mfu']:.0f}%"
        name = r["name"] + (f" ({r['attention']} attention, {r['kernels']} kernels{', remat ' + r['remat'] if r['remat'] != 'none' else ''})" if "attention" in r else "")
        print(
            f"| {name} | {r['dtype']} | {r['devices']} | {r['tokens_per_sec']:,.0f} | "
            f"{r['flops_per_sec'] / 1e9:,.1f} | {100 * r['flops_per_sec'] / dtype_ceiling:.0f}% | "
            f"{100 * r['flops_per_sec'] / ceiling['float32']:.0f}% | "
            f"{vs_same} | {vs_fp32} | {mfu} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "shape": shape, "ceiling": ceiling, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
