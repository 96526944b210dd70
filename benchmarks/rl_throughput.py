"""GRPO throughput of flan_jax vs trl's GRPOTrainer: rollout tokens/s, whole-step time and its split.

    python benchmarks/rl_throughput.py              # the ~7M Llama (train_throughput's 7m preset), CPU
    python benchmarks/rl_throughput.py --tiny       # seconds: checks that everything runs
    python benchmarks/rl_throughput.py --preset=1b  # on an accelerator

Both sides run GRPO steps of the same random-init Llama (float32) on the same prompts (random token
ids, `--prompt_len` each), `--group` samples per prompt of up to `--new_tokens` tokens (temperature 1,
no top-k / top-p, KV cache), the same reward (a cheap function of the completion tokens), a KL term
to a frozen reference (beta 0.04, one more forward pass), one AdamW update per rollout with clipping:

  * flan_jax  the RL loop's own pieces: `flan_jax.rl.rollout.Roller` (flan_jax.model.generate on the
              policy's own parameter arrays, the reward, the scoring pass for old and reference
              log-probs, group advantages) and the trainer's jitted step with the "grpo" objective.
  * trl       `trl.GRPOTrainer` (1.16): `_generate_and_score_completions` (transformers `generate`,
              the reward function, the reference model's log-probs, advantages) then `compute_loss`
              (fused LM head), backward, clipping, `torch.optim.AdamW`, on `LlamaForCausalLM` (SDPA).
              The HF Trainer's loop around it (callbacks, logging) is left out, which only favours trl.

Rollout tokens/s = completion tokens generated / generation seconds (the `generate` call alone);
the step's split is generation / the rest of the rollout (reward, scoring passes, advantages) /
the update. Each side runs in its own child process (no thread contention); the fastest of
`--windows` windows of `--steps` steps after `--warmup` steps counts, for both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BETA, BOS, EOS, PAD = 0.04, 1, 2, 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="7m", help="a model preset of benchmarks/train_throughput.py")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (params float32)")
    parser.add_argument("--json", default="")
    parser.add_argument("--side", choices=("flan_jax", "trl"), default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.preset, args.prompts, args.group, args.prompt_len, args.new_tokens = "tiny", 2, 4, 8, 8
        args.steps, args.windows, args.warmup = 2, 1, 1
    return args


def shape_of(args) -> dict:
    sys.path.insert(0, HERE)
    import train_throughput

    return dict(train_throughput.PRESETS[args.preset])


def prompt_ids(args, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(4, vocab, args.prompt_len).tolist() for _ in range(args.prompts)]


def reward_of_tokens(tokens) -> float:
    """The benchmark's reward: the share of even token ids (cheap, the same on both sides)."""
    tokens = list(tokens)
    return sum(t % 2 == 0 for t in tokens) / max(len(tokens), 1)


def _best(run, args) -> tuple[float, dict]:
    """(seconds per step, split) of the fastest window; `run()` does one step and returns its split."""
    for _ in range(args.warmup):
        run()
    best, best_split = float("inf"), {}
    for _ in range(args.windows):
        splits = [run() for _ in range(args.steps)]
        total = sum(s["step"] for s in splits) / len(splits)
        if total < best:
            best = total
            best_split = {k: sum(s[k] for s in splits) / len(splits) for k in splits[0]}
    return best, best_split


# ---------------------------------------------------------------------------- flan_jax side


def run_flan_jax(args) -> dict:
    import jax
    from flax import nnx

    sys.path.insert(0, HERE)
    import train_throughput

    from flan_jax import rl
    from flan_jax.model import registry
    from flan_jax.rl import prompts as prompts_lib, rollout as rollout_lib
    from flan_jax.rl.rewards import RewardSet
    from flan_jax.train import objectives, optimizer, partitioning, state as state_lib, step as step_lib

    shape = shape_of(args)
    rows = args.prompts * args.group
    seq_len = 1 + args.prompt_len + args.new_tokens + 1
    config = train_throughput._config({**shape, "batch": rows, "seq_len": seq_len}, "fp32" if args.dtype == "float32" else "bf16")
    config.objective.name = "grpo"
    config.rl.group_size, config.rl.max_new_tokens, config.rl.kl_coef = args.group, args.new_tokens, BETA
    config.rl.rewards = ("bench_even_ids",)
    rl.register_reward_factory("bench_even_ids", lambda c, r: lambda cs: [reward_of_tokens(x.tokens) for x in cs], replace=True)
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    rules = partitioning.axis_rules(config.mesh)
    model_cfg = registry.config_from(config.model)
    objective = objectives.get_objective(config)
    parts = state_lib.ModelParts(lambda: registry.build_model(model_cfg, rngs=nnx.Rngs(0), heads=objective.model_heads), mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, 1000)
    shardings = state_lib.state_shardings(parts, tx, mesh, objective.frozen_slots)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    state = state.replace(frozen={"reference": state_lib.copy_params(state.params)})
    tokenizer = _Ids(shape["vocab_size"])
    roller = rollout_lib.Roller(config, objective, parts, tokenizer, RewardSet(config, None), mesh, rules)
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules, objective)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    prompts = [prompts_lib.Prompt({"inputs": "", "task": "bench"}, [BOS, *p], i) for i, p in enumerate(prompt_ids(args, shape["vocab_size"]))]
    box = {"state": state, "step": 0, "tokens": 0}

    def one_step():
        box["step"] += 1
        started = time.perf_counter()
        rollout = roller(box["state"].params, box["state"].frozen, prompts, jax.random.key(box["step"]))
        rolled = time.perf_counter()
        box["state"], metrics = train_step(box["state"], partitioning.global_batch(rollout.batch, batch_sharding))
        float(metrics["loss"])  # the step's one host sync
        done = time.perf_counter()
        box["tokens"] = sum(len(c.tokens) for c in rollout.completions)
        generation = rollout.metrics["generation_seconds"]
        return {"step": done - started, "generation": generation, "rollout_rest": rolled - started - generation,
                "update": done - rolled, "tokens": box["tokens"]}

    with jax.set_mesh(mesh):
        seconds, split = _best(one_step, args)
    return {"name": "flan_jax (rl.rollout.Roller + grpo step)", **_summary(seconds, split)}


class _Ids:
    """The tokenizer interface over raw ids (the benchmark's rewards read token ids)."""

    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def __init__(self, vocab):
        self.vocab_size = vocab

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def _summary(seconds: float, split: dict) -> dict:
    return {"step_seconds": seconds, "generation_seconds": split["generation"], "rollout_rest_seconds": split["rollout_rest"],
            "update_seconds": split["update"], "completion_tokens": split["tokens"],
            "rollout_tokens_per_sec": split["tokens"] / split["generation"],
            "generation_share": split["generation"] / seconds}


# ---------------------------------------------------------------------------- trl side


def run_trl(args) -> dict:
    import contextlib
    import pathlib

    import datasets
    import tokenizers
    import torch
    import transformers
    import trl

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    shape = shape_of(args)
    vocab = shape["vocab_size"]
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=shape["d_model"], intermediate_size=shape["d_ff"], num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"], head_dim=shape["head_dim"],
        max_position_embeddings=2 * (args.prompt_len + args.new_tokens) + 8, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp / "policy")
        words = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"t{i}": i for i in range(3, vocab)}}
        model = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="t3"))
        model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        model.save(str(tmp / "tokenizer.json"))
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp / "tokenizer.json"), pad_token="<pad>",
                                                         bos_token="<s>", eos_token="</s>", unk_token="t3")
        prompts = ["<s> " + " ".join(f"t{i}" for i in p) for p in prompt_ids(args, vocab)]  # the same ids, BOS first
        rows = args.prompts * args.group
        grpo_args = trl.GRPOConfig(
            output_dir=str(tmp / "out"), report_to=[], use_cpu=True, bf16=args.dtype == "bfloat16", fp16=False,
            per_device_train_batch_size=rows, num_generations=args.group, max_completion_length=args.new_tokens,
            temperature=1.0, top_p=1.0, top_k=0, beta=BETA, loss_type="grpo", learning_rate=1e-3, weight_decay=0.1,
            adam_beta2=0.95, max_grad_norm=1.0,
        )
        dataset = datasets.Dataset.from_dict({"prompt": prompts})

        def even_ids(completions, completion_ids, **kwargs):
            return [reward_of_tokens(ids) for ids in completion_ids]

        trainer = trl.GRPOTrainer(model=str(tmp / "policy"), reward_funcs=[even_ids], args=grpo_args, train_dataset=dataset,
                                  processing_class=tokenizer)
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    inputs = [{"prompt": p} for p in prompts for _ in range(args.group)]  # trl's sampler repeats each prompt G times
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the HF Trainer's loop, which is left out
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()
    generate = trainer.model.generate
    clock = {"generation": 0.0}

    def timed_generate(*a, **k):
        started = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            clock["generation"] += time.perf_counter() - started

    trainer.model.generate = timed_generate  # the rollout's generate call alone, for the split

    def one_step():
        clock["generation"] = 0.0
        started = time.perf_counter()
        with autocast:
            batch = trainer._generate_and_score_completions(inputs)
        rolled = time.perf_counter()
        with autocast:
            loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        tokens = int(batch["completion_mask"].sum())
        return {"step": done - started, "generation": clock["generation"],
                "rollout_rest": rolled - started - clock["generation"], "update": done - rolled, "tokens": tokens}

    seconds, split = _best(one_step, args)
    return {"name": "trl GRPOTrainer (_generate_and_score_completions + compute_loss + AdamW)", **_summary(seconds, split)}


# ---------------------------------------------------------------------------- driver


def child(args, side: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{side}.json")
        command = [sys.executable, os.path.abspath(__file__), f"--preset={args.preset}", f"--prompts={args.prompts}",
                   f"--group={args.group}", f"--prompt_len={args.prompt_len}", f"--new_tokens={args.new_tokens}",
                   f"--steps={args.steps}", f"--windows={args.windows}", f"--warmup={args.warmup}", f"--dtype={args.dtype}",
                   f"--side={side}", f"--out={out}"]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run(command, env=env, check=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    args = parse_args()
    sys.path.insert(0, ROOT)
    if args.side:
        row = run_flan_jax(args) if args.side == "flan_jax" else run_trl(args)
        with open(args.out, "w") as f:
            json.dump(row, f)
        return
    trl_row = child(args, "trl")
    ours = child(args, "flan_jax")
    shape = shape_of(args)
    print(f"\n{args.preset} Llama (d {shape['d_model']}, {shape['n_layers']} layers, vocab {shape['vocab_size']}), {args.dtype}; "
          f"GRPO: {args.prompts} prompts x {args.group} samples, prompts of {args.prompt_len} tokens, up to {args.new_tokens} "
          f"new tokens, KL to a reference (beta {BETA}), one AdamW update per rollout; fastest of {args.windows} windows of "
          f"{args.steps} steps after {args.warmup} warm-up\n")
    print("| implementation | rollout tokens/s | vs trl | step (s) | vs trl | generation | rest of rollout | update |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in (ours, trl_row):
        print(f"| {r['name']} | {r['rollout_tokens_per_sec']:,.0f} | {r['rollout_tokens_per_sec'] / trl_row['rollout_tokens_per_sec']:.2f}x | "
              f"{r['step_seconds']:.2f} | {trl_row['step_seconds'] / r['step_seconds']:.2f}x | "
              f"{r['generation_seconds']:.2f} s ({100 * r['generation_share']:.0f}%) | {r['rollout_rest_seconds']:.2f} s | "
              f"{r['update_seconds']:.2f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [ours, trl_row]}, f, indent=2)


if __name__ == "__main__":
    main()
