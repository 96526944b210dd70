"""LoRA against full fine-tuning, in flan_jax and in PEFT + torch: parameters, train-state bytes,
peak host memory and step time, all measured in one run on one machine.

    python benchmarks/lora_memory.py                        # SmolLM2-135M shape and the 7M config (~25 min, 2 cores)
    python benchmarks/lora_memory.py --malloc=reuse         # step times only under the reuse tunables (half that)
    python benchmarks/lora_memory.py --presets=7m --rank=16
    python benchmarks/lora_memory.py --tiny                 # seconds: checks that every row runs
    python benchmarks/lora_memory.py --presets=1b --dtype=bfloat16 --malloc=reuse   # on a GPU (gpu_check.sh)

Rows, for each model shape (random weights: memory and time do not depend on the values):
  * flan_jax full     the trainer's jitted step (flan_jax.train.step) training every parameter
  * flan_jax LoRA     the same step with `config.lora.rank = r` on every projection (q k v o gate up
                      down): only the adapters are trained; the base is the frozen "base" slot
                      (float32, or bfloat16 with --frozen_dtype=bfloat16)
  * torch full        transformers' LlamaForCausalLM + torch.optim.AdamW
  * PEFT LoRA         the same model wrapped by peft.get_peft_model(LoraConfig(r, "all-linear"))

Both sides use AdamW (b2 0.95, weight decay 0.1), global-norm clipping at 1.0, float32 params,
`--dtype` compute (float32, or bfloat16: flan_jax's `model.dtype`, torch's autocast), the same
batch. On a machine with a GPU both sides run on it (flan_jax with cuDNN attention, torch on
"cuda" with fused AdamW, as benchmarks/train_throughput.py), and "peak device" is the device's
high-water mark (the jax allocator's `peak_bytes_in_use`, `torch.cuda.max_memory_allocated`);
the host's malloc settings do not matter there (use --malloc=reuse).

Each row runs in its own child process, so "peak RSS" is that run's own high-water mark
(`ru_maxrss`: model, optimizer, activations, runtime, and the imports). Every row runs under each
`--malloc` setting, both sides in the same environment:
  * default   glibc's malloc as a process gets it (what the library runs with unless told otherwise);
  * reuse     glibc's malloc reuse tunables (flan_jax/host_memory.py; as the torch rows of
              benchmarks/train_throughput.py): faster steps on both sides, but the heap keeps its
              peak and its holes, so peak RSS grows (a SmolLM2-shape LoRA step: 3.3 GB -> 6-11 GB).
Ratios compare rows of the same model and malloc setting. Train state = every parameter (trained
and frozen) + the optimizer state; "trained state" = the trained parameters + their optimizer
state. Step time: the fastest of `--windows` windows of `--steps` steps after `--warmup` (one
host sync per window).
Prints a Markdown table for benchmarks/RESULTS.md; --json writes the rows.

Targets (issue 16): LoRA train state <= 35% of full fine-tuning's, LoRA step time <= 0.8x full
fine-tuning's and <= 1.0x PEFT + torch's on the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from benchmarks.train_throughput import PRESETS as _THROUGHPUT  # noqa: E402  (the same model shapes)

_UNTIED = dict(tie=False, rope_theta=10000.0)  # as train_throughput's models (flan_jax's and transformers' defaults)
PRESETS = {
    # HuggingFaceTB/SmolLM2-135M's architecture (Llama, tied embeddings), random weights.
    "smollm2_135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536,
                         tie=True, rope_theta=100000.0, batch=4, seq_len=256),
    # train_throughput's ~1B Llama (its GPU row): LoRA on a model that needs a GPU.
    "1b": {**_THROUGHPUT["1b"], **_UNTIED},
    # train_throughput's ~7M configuration.
    "7m": {**_THROUGHPUT["7m"], **_UNTIED},
    "tiny": {**_THROUGHPUT["tiny"], **_UNTIED},
}
RUNS = ("flan_jax full", "flan_jax LoRA", "torch full", "PEFT LoRA")
MALLOC = ("default", "reuse")  # the children's glibc malloc: as a process gets it, or with host_memory.REUSE_TUNABLES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="smollm2_135m,7m", help=f"comma list of {sorted(PRESETS)}")
    parser.add_argument("--tiny", action="store_true", help="--presets=tiny --steps=2 --warmup=1 --windows=1")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma list of " + ", ".join(RUNS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype, both sides")
    parser.add_argument("--frozen_dtype", default="", choices=("", "bfloat16"), help="flan_jax LoRA: dtype of the frozen base")
    parser.add_argument("--malloc", default=",".join(MALLOC), help="comma list of " + ", ".join(MALLOC))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # "<preset>|<run>|<output file>"
    args = parser.parse_args(argv)
    if args.tiny:
        args.presets, args.steps, args.warmup, args.windows = "tiny", 2, 1, 1
    unknown = sorted(set(args.malloc.split(",")) - set(MALLOC))
    if unknown:
        parser.error(f"--malloc: unknown setting(s) {unknown}; choose from {list(MALLOC)}")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        preset, run, out = args.child.split("|")
        row = measure(PRESETS[preset], run, args)
        row.update(preset=preset, run=run, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
        with open(out, "w") as f:
            json.dump(row, f)
        return
    rows = []
    for malloc in args.malloc.split(","):
        for preset in args.presets.split(","):
            for run in args.runs.split(","):
                rows.append({**child(preset, run, args, malloc_environ(malloc)), "malloc": malloc})
                if args.json:  # after every row: a run stopped at a time limit keeps the rows it measured
                    with open(args.json, "w") as f:
                        json.dump({"rows": rows, "args": vars(args)}, f, indent=2)
    report(rows, args)
    failed = [r for r in rows if "error" in r]
    if failed:
        sys.exit(f"{len(failed)} of {len(rows)} rows failed: " + "; ".join(f"{r['preset']} {r['run']}: {r['error']}" for r in failed))


def malloc_environ(malloc: str) -> dict[str, str]:
    """This process's environment with glibc's malloc tunables as `malloc` asks (none of ours, or
    the reuse tunables without huge pages: torch measured slower with those)."""
    from flan_jax import host_memory

    # On a GPU each child takes the device memory it needs instead of 75% up front (unless told otherwise).
    plain = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **host_memory.environ_without(dict(os.environ))}
    return plain if malloc == "default" else host_memory.environ_with(plain, host_memory.REUSE_TUNABLES)


def child(preset: str, run: str, args: argparse.Namespace, environ: dict[str, str]) -> dict:
    """One row, measured in a fresh process (its own peak RSS). A child that fails gives a row with
    its exit status under "error" (its traceback is on stderr), so the other rows still run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        forwarded = [f"--rank={args.rank}", f"--alpha={args.alpha}", f"--frozen_dtype={args.frozen_dtype}", f"--dtype={args.dtype}",
                     f"--steps={args.steps}", f"--windows={args.windows}", f"--warmup={args.warmup}"]
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded, f"--child={preset}|{run}|{out}"],
                              env=environ)
        if done.returncode != 0:
            return {"preset": preset, "run": run, "error": f"child exited with status {done.returncode}"}
        with open(out) as f:
            return json.load(f)


def _batch(shape: dict) -> dict:
    return common.random_batch(shape["batch"], shape["seq_len"], shape["vocab_size"])


def _timed(step, args) -> float:
    """Seconds per step: the fastest window; `step()` returns something to sync on."""
    for _ in range(args.warmup):
        result = step()
    _sync(result)
    best = float("inf")
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            result = step()
        _sync(result)
        best = min(best, (time.perf_counter() - start) / args.steps)
    return best


def _sync(result) -> None:
    if hasattr(result, "block_until_ready"):
        result.block_until_ready()
    elif hasattr(result, "item"):
        result.item()


def measure(shape: dict, run: str, args: argparse.Namespace) -> dict:
    if run.startswith("flan_jax"):
        return measure_flan_jax(shape, lora=run.endswith("LoRA"), args=args)
    return measure_torch(shape, lora=run.startswith("PEFT"), args=args)


def measure_flan_jax(shape: dict, *, lora: bool, args) -> dict:
    import jax
    import numpy as np

    from flan_jax import default_config

    config = default_config.get_config()
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "rope_theta"):
        config.model[key] = shape[key]
    config.model.tie_embeddings = shape["tie"]
    config.model.max_positions = shape["seq_len"]
    config.data.batch_size, config.data.seq_len = shape["batch"], shape["seq_len"]
    config.optimizer.warmup_steps = 0
    config.model.dtype = args.dtype
    on_gpu = jax.default_backend() == "gpu"
    config.model.attention = "cudnn" if on_gpu else "xla"  # as benchmarks/train_throughput.py
    if lora:
        config.lora.rank, config.lora.alpha = args.rank, args.alpha
        config.trainable.frozen_dtype = args.frozen_dtype
    trainer = common.trainer_step(config)
    mesh, train_step = trainer.mesh, trainer.step
    batch = trainer.place(_batch(shape))

    holder = {"state": trainer.state}

    def one_step():
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics["loss"]

    with jax.set_mesh(mesh):
        seconds = _timed(one_step, args)
    state = holder["state"]
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    trained, opt, frozen = nbytes(state.params), nbytes(state.opt_state), nbytes(state.frozen)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    stats = (jax.local_devices()[0].memory_stats() or {}) if on_gpu else {}
    return {
        "trainable_params": count(state.params), "total_params": count(state.params) + count(state.frozen),
        "train_state_bytes": trained + opt + frozen, "trained_state_bytes": trained + opt,
        "step_seconds": seconds, "tokens_per_sec": shape["batch"] * shape["seq_len"] / seconds,
        "device": jax.default_backend(), "peak_device_bytes": stats.get("peak_bytes_in_use"),
    }


def measure_torch(shape: dict, *, lora: bool, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # report() says so if jax ran elsewhere
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=shape["seq_len"], tie_word_embeddings=shape["tie"],
        rope_theta=shape["rope_theta"], bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa",
    ))
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device == "cuda" else {}
    opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, **fused)
    batch = _batch(shape)
    inputs = torch.from_numpy(batch["input_tokens"]).long().to(device)
    labels = torch.from_numpy(batch["target_tokens"]).long().to(device)
    compute = getattr(torch, args.dtype)

    def one_step():
        with torch.autocast(device, dtype=compute, enabled=compute != torch.float32):
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    seconds = _timed(one_step, args)
    params = {id(p): p for p in model.parameters()}  # tied weights once
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    trained_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return {
        "trainable_params": sum(p.numel() for p in trainable), "total_params": sum(p.numel() for p in params.values()),
        "train_state_bytes": param_bytes + opt_bytes, "trained_state_bytes": trained_bytes + opt_bytes,
        "step_seconds": seconds, "tokens_per_sec": shape["batch"] * shape["seq_len"] / seconds,
        "device": "gpu" if device == "cuda" else "cpu",
        "peak_device_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def report(rows: list[dict], args) -> None:
    import platform

    rows = [r for r in rows if "error" not in r]  # main() names the failed ones
    devices = {r["run"]: r.get("device", "cpu") for r in rows}
    on_gpu = "gpu" in devices.values()
    if len(set(devices.values())) > 1:
        print(f"\nWARNING: the rows ran on different devices, so their times do not compare: {devices}")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores{', GPU' if on_gpu else ''}; "
          f"LoRA r={args.rank}, alpha={args.alpha} on every projection; {args.dtype} compute; fastest of "
          f"{args.windows} windows of {args.steps} steps after {args.warmup}")
    print("\n| model | malloc | run | trainable params | train state | trained state | peak RSS | "
          f"{'peak device | ' if on_gpu else ''}step (s) | state vs full | step vs full | step vs PEFT |")
    print(f"|---|---|---|---:|---:|---:|---:|{'---:|' if on_gpu else ''}---:|---:|---:|---:|")
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    for r in rows:
        side = "flan_jax" if r["run"].startswith("flan_jax") else "torch"
        same = [x for x in rows if x["preset"] == r["preset"] and x["malloc"] == r["malloc"]]
        full = next((x for x in same if x["run"] == ("flan_jax full" if side == "flan_jax" else "torch full")), None)
        peft = next((x for x in same if x["run"] == "PEFT LoRA"), None)
        state_ratio = f"{r['train_state_bytes'] / full['train_state_bytes']:.1%}" if full else "-"
        step_ratio = f"{r['step_seconds'] / full['step_seconds']:.2f}x" if full else "-"
        vs_peft = f"{r['step_seconds'] / peft['step_seconds']:.2f}x" if peft and r["run"].endswith("LoRA") else "-"
        print(f"| {r['preset']} | {r['malloc']} | {r['run']} | {r['trainable_params']:,} | {mib(r['train_state_bytes'])} | "
              f"{mib(r['trained_state_bytes'])} | {mib(r['peak_rss_bytes'])} | "
              f"{(mib(r['peak_device_bytes']) if r.get('peak_device_bytes') else '-') + ' | ' if on_gpu else ''}"
              f"{r['step_seconds']:.3f} | "
              f"{state_ratio} | {step_ratio} | {vs_peft} |")


if __name__ == "__main__":
    main()
