"""DPO training throughput of flan_jax vs trl's DPOTrainer, and the peak host memory of both.

    python benchmarks/preference_throughput.py            # the ~7M Llama (train_throughput's 7m preset), CPU
    python benchmarks/preference_throughput.py --tiny     # seconds: checks that everything runs

Both sides train the same ~7M Llama (random init, float32 parameters; compute in float32, and with
--variants=bf16 in bfloat16: jax's compute dtype, torch's autocast) with DPO (sigmoid loss, beta 0.1)
on the same preference pairs, the same pairs per step, with AdamW and gradient clipping. The pairs
are random tokens with the lengths of the shipped HH-RLHF pairs (characters / 4; `--lengths`), the
pairs that fit a row whole, so neither side truncates:

  * flan_jax  the trainer's jitted step (`flan_jax.train.step.make_train_step`) with the "dpo"
              objective; the pairs packed by the pairs converter (both halves of a pair in one row of
              `--seq_len`, several pairs per row), `--rows` rows per step.
  * trl       `trl.DPOTrainer` (1.16): its collator (one padded sequence per response, chosen then
              rejected) and its `compute_loss` (the fused-LM-head forward and its DPO loss), then
              backward, clipping and `torch.optim.AdamW`, on `transformers.LlamaForCausalLM` (SDPA
              attention). The HF Trainer's loop around it (logging, callbacks) is left out, which
              only favours trl.

Reference log-probs are computed the same way on both sides: once, before timing, by a forward pass
of the frozen initial model over the pairs (flan_jax: the reference cache's per-token feature, as
`objective.reference="cache"` trains; trl: `precompute_ref_log_probs`, its `ref_chosen_logps` /
`ref_rejected_logps` batch columns). Only training steps are timed.

Tokens/s counts the tokens of the pairs (prompt + chosen and prompt + rejected, i.e. what both
models read), not padding, so the two sides are measured on the same work. Each side runs in its
own child process: torch with glibc's reuse tunables but without huge pages (its fastest setting,
as in benchmarks/train_throughput.py), flan_jax twice, with the launchers' malloc tunables (fastest;
they keep the peak heap resident) and with the default malloc (its memory without them). Peak
resident memory is the child's `ru_maxrss`. Steps are timed in `--windows` windows of `--steps` steps
after `--warmup` steps; the fastest window counts, the same rule for both.
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

HERE = os.path.dirname(os.path.abspath(__file__))
BETA = 0.1
HH_FILE = "hh_rlhf/harmless-base-test.jsonl.gz"
CHARS_PER_TOKEN = 4  # a BPE vocabulary's usual rate on English text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7m", help="a model preset of benchmarks/train_throughput.py")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset and a few steps")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--rows", type=int, default=8, help="packed rows per flan_jax step (the pairs of these rows make trl's batch)")
    parser.add_argument("--lengths", choices=("auto", "hh_rlhf", "uniform"), default="auto",
                        help="pair lengths: those of the shipped HH-RLHF pairs (auto: when FLAN_JAX_DATA_DIR has them), "
                             "or uniform ranges")
    parser.add_argument("--variants", default="fp32,bf16", help="comma list of fp32, bf16 (compute dtype; params float32)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="")
    parser.add_argument("--side", choices=("flan_jax", "trl"), default="", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.preset, args.seq_len, args.rows, args.steps, args.windows, args.warmup = "tiny", 64, 4, 2, 1, 1
    if args.lengths == "auto":
        data_dir = os.environ.get("FLAN_JAX_DATA_DIR", "")
        args.lengths = "hh_rlhf" if data_dir and os.path.isfile(os.path.join(data_dir, HH_FILE)) else "uniform"
    return args


def shape_of(args) -> dict:
    sys.path.insert(0, HERE)
    import train_throughput

    return dict(train_throughput.PRESETS[args.preset])


def hh_rlhf_lengths() -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) lengths in tokens of the shipped HH-RLHF pairs (characters / 4)."""
    from flan_jax import data
    from flan_jax.data.preference import HHRLHFFormat

    task = data.PreferenceTask("bench_hh", data.JsonlSource({"test": os.path.join(os.environ["FLAN_JAX_DATA_DIR"], HH_FILE)}),
                               pair_format=HHRLHFFormat(), on_bad_pair="skip")
    return [tuple(max(1, len(r[k]) // CHARS_PER_TOKEN) for k in ("prompt", "chosen", "rejected")) for r in task.records("test")]


def packed_rows(shape: dict, seq_len: int, rows: int, lengths: str = "uniform", seed: int = 0):
    """(pairs, their features, rows of pair indices, the indices used): random token pairs packed
    best-fit (the loader's packer) into exactly `rows` rows.

    lengths "hh_rlhf": each pair takes the lengths of a random HH-RLHF pair that fits the row whole
    (longer ones are skipped, so both sides see the same untruncated pairs); "uniform": prompts of
    1/8..3/8 of the row, responses of 1/32..3/16.
    """
    import numpy as np

    from flan_jax.data.converters.pairs import build_pair_features
    from flan_jax.data.features import FeatureConfig
    from flan_jax.data.packing import OpenRows

    rng = np.random.default_rng(seed)
    config = FeatureConfig(seq_len=seq_len)
    vocab = shape["vocab_size"]
    real = [n for n in hh_rlhf_lengths() if 2 * (1 + n[0]) + n[1] + n[2] <= seq_len] if lengths == "hh_rlhf" else None
    pairs, features, out_rows = [], [], []
    packer = OpenRows(seq_len, 4, build=lambda examples, n: examples)
    while len(out_rows) < rows:
        if real is not None:
            sizes = real[int(rng.integers(len(real)))]
        else:
            sizes = (int(rng.integers(seq_len // 8, 3 * seq_len // 8)), int(rng.integers(seq_len // 32, 3 * seq_len // 16)),
                     int(rng.integers(seq_len // 32, 3 * seq_len // 16)))
        pair = tuple(rng.integers(4, vocab, n).tolist() for n in sizes)
        f, _ = build_pair_features(*pair, bos_id=1, eos_id=2, config=config)
        pairs.append(pair)
        features.append(f)
        row = packer.add(len(pairs) - 1, {**f, "index": np.asarray([len(pairs) - 1])})
        if row is not None:
            out_rows.append([int(e["index"][0]) for e in row])
    used = sorted(i for r in out_rows for i in r)
    return pairs, features, out_rows, used


# ---------------------------------------------------------------------------- flan_jax side


def run_flan_jax(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    sys.path.insert(0, HERE)
    import train_throughput

    from flan_jax.data.converters.pairs import REFERENCE_FEATURE, build_pair_row, reference_feature
    from flan_jax.model import registry
    from flan_jax.train import objectives, optimizer, partitioning, state as state_lib, step as step_lib

    shape = {**shape_of(args), "batch": args.rows, "seq_len": args.seq_len}
    pairs, features, rows, used = packed_rows(shape, args.seq_len, args.rows, args.lengths)
    config = train_throughput._config(shape, args.variant)
    config.objective.name = "dpo"
    config.objective.beta = BETA
    config.objective.reference = "cache"
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    rules = partitioning.axis_rules(config.mesh)
    model_cfg = registry.config_from(config.model)
    parts = state_lib.ModelParts(lambda: registry.build_model(model_cfg, rngs=nnx.Rngs(0)), mesh, rules)
    objective = objectives.get_objective(config)
    tx, schedule = optimizer.make_optimizer(config.optimizer, 1000)
    shardings = state_lib.state_shardings(parts, tx, mesh, objective.frozen_slots)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    batch_sharding = partitioning.batch_sharding(mesh, rules)

    plain = [build_pair_row([features[i] for i in r], args.seq_len) for r in rows]
    plain_batch = {k: np.stack([row[k] for row in plain]) for k in plain[0]}
    started = time.perf_counter()
    with jax.set_mesh(mesh):  # the reference pass: the initial policy's per-response log-probs, once
        sums = jax.jit(lambda params, b: objective.response_log_probs(parts.merge(params), b))(
            state.params, partitioning.global_batch(plain_batch, batch_sharding))
    reference_seconds = time.perf_counter() - started
    chosen, rejected = np.asarray(sums.chosen), np.asarray(sums.rejected)
    with_reference = []
    for r, row in enumerate(rows):
        with_reference.append(build_pair_row(
            [{**features[i], REFERENCE_FEATURE: reference_feature(features[i], (chosen[r, k], rejected[r, k]))} for k, i in enumerate(row)],
            args.seq_len))
    batch = partitioning.global_batch({k: np.stack([row[k] for row in with_reference]) for k in with_reference[0]}, batch_sharding)
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules, objective)
    with jax.set_mesh(mesh):
        elapsed, loss = _time(lambda s: train_step(s, batch), state, args, lambda m: float(m["loss"]))
    tokens = sum(len(features[i]["input_tokens"]) for i in used)
    return {"name": "flan_jax (dpo objective, packed pairs)", "variant": args.variant, "tokens_per_step": tokens, "pairs_per_step": len(used),
            "rows": args.rows, "seq_len": args.seq_len, "tokens_per_sec": args.steps * tokens / elapsed,
            "reference_pass_seconds": reference_seconds, "final_loss": loss,
            "peak_rss_mb": _peak_rss_mb(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def _time(step, state, args, read):
    for _ in range(args.warmup):
        state, metrics = step(state)
    read(metrics)
    best = float("inf")
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state)
        value = read(metrics)  # the one host sync per window
        best = min(best, time.perf_counter() - start)
    return best, value


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


# ---------------------------------------------------------------------------- trl side


def run_trl(args) -> dict:
    import contextlib

    import datasets
    import torch
    import transformers
    import trl

    sys.path.insert(0, os.path.dirname(HERE))
    from tests import preference_fakes

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    shape = {**shape_of(args), "batch": args.rows, "seq_len": args.seq_len}
    pairs, features, rows, used = packed_rows(shape, args.seq_len, args.rows, args.lengths)
    hf_config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=args.seq_len, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(hf_config)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = preference_fakes.hf_tokenizer(__import__("pathlib").Path(tmp))
        dataset = datasets.Dataset.from_dict({"prompt": ["t5"], "chosen": [" t6"], "rejected": [" t7"]})
        dpo_args = trl.DPOConfig(output_dir=os.path.join(tmp, "out"), report_to=[], use_cpu=True, bf16=False, fp16=False,
                                 beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None,
                                 learning_rate=1e-3, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0)
        trainer = trl.DPOTrainer(model=model, args=dpo_args, train_dataset=dataset, processing_class=tokenizer)
    examples = [{"prompt_ids": [1, *pairs[i][0]], "chosen_ids": [*pairs[i][1], 2], "rejected_ids": [*pairs[i][2], 2]} for i in used]
    started = time.perf_counter()
    reference = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(examples))  # the precompute pass
    reference_seconds = time.perf_counter() - started
    for example, c, r in zip(examples, *[x.tolist() for x in reference]):
        example.update(ref_chosen_logps=c, ref_rejected_logps=r)
    batch = trainer.data_collator(examples)
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    trainer.model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.variant == "bf16" else contextlib.nullcontext()

    def one_step(_):
        with autocast:
            loss = trainer.compute_loss(trainer.model, batch)  # trl's DPO forward (fused LM head) and loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return _, {"loss": loss.detach()}

    elapsed, loss = _time(one_step, None, args, lambda m: float(m["loss"]))
    tokens = sum(len(features[i]["input_tokens"]) for i in used)
    padded = int(batch["input_ids"].numel())
    return {"name": "trl DPOTrainer (compute_loss + AdamW)", "variant": args.variant, "tokens_per_step": tokens, "pairs_per_step": len(used),
            "padded_tokens_per_step": padded, "tokens_per_sec": args.steps * tokens / elapsed,
            "reference_pass_seconds": reference_seconds, "final_loss": loss, "peak_rss_mb": _peak_rss_mb(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


# ---------------------------------------------------------------------------- driver


def child(args, side: str, variant: str, environ: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{side}.json")
        command = [sys.executable, os.path.abspath(__file__), f"--preset={args.preset}", f"--seq_len={args.seq_len}",
                   f"--rows={args.rows}", f"--steps={args.steps}", f"--windows={args.windows}", f"--warmup={args.warmup}",
                   f"--lengths={args.lengths}", f"--side={side}", f"--variant={variant}", f"--out={out}"]
        subprocess.run(command, env=environ, check=True)
        with open(out) as f:
            return json.load(f)


DTYPES = {"fp32": "float32", "bf16": "bf16 compute / fp32 params"}


def main() -> None:
    args = parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    if args.side:
        row = run_flan_jax(args) if args.side == "flan_jax" else run_trl(args)
        with open(args.out, "w") as f:
            json.dump(row, f)
        return
    from flan_jax import host_memory

    base = dict(os.environ)
    tuned = host_memory.environ_with(base, host_memory.TUNABLES)
    plain = host_memory.environ_without(base, tuple(host_memory.TUNABLES))
    torch_env = host_memory.environ_with(host_memory.environ_without(base, (host_memory.HUGE_PAGES,)), host_memory.REUSE_TUNABLES)
    rows = []
    for variant in args.variants.split(","):
        trl_row = child(args, "trl", variant, torch_env)
        for environ, malloc in ((tuned, "launcher malloc tunables"), (plain, "default malloc")):
            rows.append({**child(args, "flan_jax", variant, environ), "malloc": malloc, "trl_rate": trl_row["tokens_per_sec"]})
        rows.append({**trl_row, "malloc": "reuse tunables, no huge pages", "trl_rate": trl_row["tokens_per_sec"]})
    shape = shape_of(args)
    first = rows[0]
    print(f"\n{args.preset} Llama (d {shape['d_model']}, {shape['n_layers']} layers, vocab {shape['vocab_size']}), float32 params, "
          f"DPO beta {BETA}; pair lengths: {args.lengths}; {first['pairs_per_step']} pairs ({first['tokens_per_step']:,} pair tokens) "
          f"per step = {args.rows} packed rows x {args.seq_len} for flan_jax, {rows[2]['padded_tokens_per_step']:,} padded "
          f"positions for trl; reference log-probs precomputed on both sides; fastest of {args.windows} windows of "
          f"{args.steps} steps after {args.warmup} warm-up\n")
    print("| implementation | compute | malloc | pair tokens/s | vs trl, same compute | reference pass (s) | peak host RSS (MB) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {DTYPES[r['variant']]} | {r['malloc']} | {r['tokens_per_sec']:,.0f} | "
              f"{r['tokens_per_sec'] / r['trl_rate']:.2f}x | {r['reference_pass_seconds']:.2f} | {r['peak_rss_mb']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
