"""T5 speed against transformers, same weights, same batch, same run.

Training: flan_jax's train step (the trainer's jitted step: SFT objective on the "encdec" batch,
AdamW, clipping) against `T5ForConditionalGeneration` + `torch.optim.AdamW` (+ the same clipping),
on unpacked rows of `--inputs_len` encoder and `--targets_len` decoder tokens. Tokens/s counts every
encoder and decoder position of a step (batch x (inputs_len + targets_len)), the same on both
sides. The first step's losses are printed side by side: same weights and batch, so they agree.

Decoding: `flan_jax.model.generate.generate` (encoder once, decoder KV cache, shape buckets)
against transformers' `generate` (its default cache), greedy, both forced to `--max_new_tokens`
new tokens, on the same batch of prompts; generated tokens agreeing is reported too.

One random T5 v1.1 (gated GELU, untied head) is built in transformers from a config (nothing is
downloaded), saved and imported with flan_jax.convert. Both sides run in this process one after
the other (torch with its default threads); other jobs may share the machine, so only the ratios
within one run mean something (benchmarks/RESULTS.md).

    python benchmarks/t5.py                 # d256, 4+4 layers, vocab 8000, 8 x (512 + 128) tokens
    python benchmarks/t5.py --tiny          # seconds: the smoke test (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from flan_jax import convert, default_config  # noqa: E402
from flan_jax.convert import checkpoint  # noqa: E402
from flan_jax.data.converters import ENCDEC  # noqa: E402
from flan_jax.model import generate as gen, registry  # noqa: E402
from flan_jax.train import metrics, optimizer, partitioning, state as state_lib, step as step_lib  # noqa: E402

TINY = dict(d_model=32, n_layers=1, n_heads=2, head_dim=16, d_ff=64, vocab=256, batch=2, inputs_len=32,
            targets_len=8, steps=2, decode_batch=2, max_new_tokens=4, repeats=1, dtypes="float32")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4, help="encoder layers = decoder layers")
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--d_ff", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs_len", type=int, default=512)
    p.add_argument("--targets_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed training steps per side (after one warm-up)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes to train with (params stay float32)")
    p.add_argument("--decode_batch", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed decoding calls per side")
    p.add_argument("--parts", default="train,decode", help="what to measure: train, decode or both")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def build_hf(args, path: str):
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=args.vocab, d_model=args.d_model, d_kv=args.head_dim, d_ff=args.d_ff, num_layers=args.n_layers,
        num_heads=args.n_heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
    )
    model = transformers.T5ForConditionalGeneration(config)
    with torch.no_grad():  # an untied head (the FLAN-T5 layout) and weights giving non-degenerate greedy paths
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * args.d_model**-0.5)
        for name, p in model.named_parameters():
            if "layer_norm" not in name and name != "lm_head.weight":
                p.normal_(0.0, 0.1 if "shared" not in name else 1.0)
    model.save_pretrained(path)
    return model


def train_batch(args, seed: int = 0) -> dict[str, np.ndarray]:
    """Unpacked rows, every position real: what both sides can take without packing support."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(args.batch):
        targets = rng.integers(2, args.vocab, args.targets_len).astype(np.int32)
        rows.append(ENCDEC.pad_one({
            "encoder_input_tokens": rng.integers(2, args.vocab, args.inputs_len).astype(np.int32),
            "decoder_target_tokens": targets,
            "decoder_input_tokens": np.concatenate([[0], targets[:-1]]).astype(np.int32),
            "decoder_loss_weights": np.ones(args.targets_len, np.float32),
        }, row_shape=(args.inputs_len, args.targets_len)))
    return {key: np.stack([row[key] for row in rows]) for key in ENCDEC.batch_keys}


def experiment_config(args, cfg, dtype: str):
    config = default_config.get_config()
    config.model.update({k: v for k, v in cfg.replace(dtype=dtype).to_dict().items() if k in config.model})
    config.data.update(seq_len=args.inputs_len, targets_len=args.targets_len, batch_size=args.batch)
    config.optimizer.update(warmup_steps=0, schedule="constant", learning_rate=1e-4)
    config.mesh.data = 1
    return config


def run_flan_jax(args, cfg, params, batch, dtype: str) -> dict:
    config = experiment_config(args, cfg, dtype)
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    rules = partitioning.axis_rules(config.mesh)
    model_cfg = registry.config_from(config.model)
    parts = state_lib.ModelParts(lambda: registry.build_model(model_cfg, rngs=nnx.Rngs(0)), mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, 1000)
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, seed=0, mesh=mesh)
    imported = checkpoint.nest({p: np.asarray(v, np.float32) for p, v in params.items()})
    state = state.replace(params=jax.tree.map(jax.device_put, imported, parts.param_shardings))
    state = state.replace(opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(state.params))
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    global_batch = partitioning.global_batch(batch, partitioning.batch_sharding(mesh, rules))
    times, losses = [], []
    with jax.set_mesh(mesh):
        for i in range(args.steps + 1):
            start = time.perf_counter()
            state, out = train_step(state, global_batch)
            losses.append(float(jax.block_until_ready(out["loss"])))
            if i:
                times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    per_token = model_cfg.flops_per_token(0, config.data)
    return dict(name="flan_jax train step", dtype=dtype, step_sec=step_time, first_loss=losses[0],
                tokens_per_sec=args.batch * (args.inputs_len + args.targets_len) / step_time, flops_per_token=per_token)


def run_torch(args, hf_model, batch, dtype: str) -> dict:
    model = hf_model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    inputs = dict(
        input_ids=torch.as_tensor(batch["encoder_input_tokens"], dtype=torch.long),
        decoder_input_ids=torch.as_tensor(batch["decoder_input_tokens"], dtype=torch.long),
        labels=torch.as_tensor(batch["decoder_target_tokens"], dtype=torch.long),
    )
    times, losses = [], []
    for i in range(args.steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if i:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    return dict(name="transformers + torch AdamW", dtype=dtype, step_sec=step_time, first_loss=losses[0],
                tokens_per_sec=args.batch * (args.inputs_len + args.targets_len) / step_time)


def decoding(args, cfg, params, hf_model) -> dict:
    ours = nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(ours, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpoint.nest({tuple(str(k) for k in p): np.asarray(v) for p, v in params.items()}))
    nnx.update(ours, state)
    rng = np.random.default_rng(1)
    lengths = rng.integers(max(args.inputs_len // 8, 2), args.inputs_len // 2 + 1, args.decode_batch)
    prompts = [[*rng.integers(2, args.vocab, n - 1).tolist(), 1] for n in lengths]  # T5 prompts end with EOS
    width = int(max(lengths))
    ids = torch.zeros((args.decode_batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)], mask[row, :len(prompt)] = torch.tensor(prompt), 1

    def ours_call():
        return gen.generate(ours, prompts, max_new_tokens=args.max_new_tokens, eos_id=-1)

    def hf_call():
        with torch.no_grad():
            out = hf_model.eval().generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                do_sample=False, num_beams=1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=None,
            )
        return out[:, 1:].tolist()

    timings = {}
    outputs = {}
    for name, call in (("flan_jax", ours_call), ("transformers", hf_call)):
        start = time.perf_counter()
        outputs[name] = call()  # warm-up: compilation (JAX), allocator (torch)
        first = time.perf_counter() - start
        best = min(_timed(call) for _ in range(args.repeats))
        timings[name] = (first, best)
    new_tokens = args.decode_batch * args.max_new_tokens
    return {
        "batch": args.decode_batch, "prompt_lengths": [int(n) for n in lengths], "max_new_tokens": args.max_new_tokens,
        "flan_jax_tokens_per_sec": new_tokens / timings["flan_jax"][1], "flan_jax_first_call_sec": timings["flan_jax"][0],
        "transformers_tokens_per_sec": new_tokens / timings["transformers"][1],
        "speedup": timings["transformers"][1] / timings["flan_jax"][1],
        "greedy_token_agreement": float(np.mean(np.asarray(outputs["flan_jax"]) == np.asarray(outputs["transformers"]))),
    }


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_hf(args, tmp)
        cfg, params = convert.load_hf_params(tmp)
    cfg = cfg.replace(dropout_rate=0.0)
    batch = train_batch(args)
    rows = []
    peak = {}
    for dtype in args.dtypes.split(",") if "train" in args.parts else ():
        rows.append(run_flan_jax(args, cfg, params, batch, dtype))
        # The same starting weights per run (a copy: transformers 5 would tie a freshly built head).
        rows.append(run_torch(args, copy.deepcopy(hf_model), batch, dtype))
        peak[dtype] = metrics.measure_matmul_flops(dtype=dtype)
    for row in rows:
        if "flops_per_token" in row:
            row["mfu_of_cpu_matmul_peak"] = row["flops_per_token"] * row["tokens_per_sec"] / peak[row["dtype"]]
    decode = decoding(args, cfg, params, hf_model) if "decode" in args.parts else {}
    result = {
        "model": f"T5 v1.1 d{args.d_model}, {args.n_layers}+{args.n_layers} layers, vocab {args.vocab} "
                 f"({cfg.num_params / 1e6:.1f}M params)",
        "train_batch": f"{args.batch} x ({args.inputs_len} + {args.targets_len}) tokens",
        "device": str(jax.devices()[0]), "cpu_matmul_peak_flops": peak, "train": rows, "decode": decode,
    }
    print("| side | dtype | step s | tokens/s | first loss |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['dtype']} | {row['step_sec']:.3f} | {row['tokens_per_sec']:,.0f} | {row['first_loss']:.5f} |")
    for dtype in args.dtypes.split(",") if rows else ():
        ours, theirs = (next(r for r in rows if r["dtype"] == dtype and r["name"].startswith(n)) for n in ("flan_jax", "trans"))
        print(f"train {dtype}: flan_jax / transformers = {ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}x")
    if decode:
        print(f"decode: flan_jax {decode['flan_jax_tokens_per_sec']:,.0f} tok/s, transformers "
              f"{decode['transformers_tokens_per_sec']:,.0f} tok/s = {decode['speedup']:.2f}x; "
              f"greedy agreement {decode['greedy_token_agreement']:.3f}")
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
