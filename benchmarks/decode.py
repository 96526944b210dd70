"""Decoding tokens/s: flan_jax KV-cache `generate` versus transformers `generate`, same model, same run.

One random Llama is built in transformers from a config (nothing downloaded), saved, and imported
with flan_jax.convert, so both sides hold identical weights. Both decode the same batch of
left-padded prompts greedily for exactly `--max_new_tokens` tokens (no EOS), after one warm-up
call each (compilation for JAX, allocator warm-up for torch). Also reports how many generated
tokens agree (fp32 greedy decoding should agree almost everywhere; ties can differ).

    python benchmarks/decode.py                          # d256 x 4 layers, vocab 8000, batch 8
    python benchmarks/decode.py --d_model=64 --n_layers=2 --vocab=512 --max_new_tokens=16 --repeats=1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from flan_jax import convert  # noqa: E402
from flan_jax import model as fm  # noqa: E402
from flan_jax.convert import checkpoint  # noqa: E402
from flan_jax.model import generate as gen  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=4)
    p.add_argument("--d_ff", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min_prompt", type=int, default=16)
    p.add_argument("--max_prompt", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype of both sides")
    p.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
    return p.parse_args()


def build_hf_model(args, path: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so greedy paths are not degenerate
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return model


def main() -> None:
    args = parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.batch)
    prompts = [rng.integers(3, args.vocab, n).tolist() for n in lengths]
    new_tokens = args.batch * args.max_new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_hf_model(args, tmp)
        cfg, params = convert.load_hf_params(tmp)
    cfg = cfg.replace(dtype=args.dtype, attention="xla")
    ours = nnx.eval_shape(lambda: fm.Transformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(ours, nnx.Param)
    nnx.replace_by_pure_dict(state, checkpoint.nest({p: jnp.asarray(v) for p, v in params.items()}))
    nnx.update(ours, state)

    def run_ours():
        return gen.generate(ours, prompts, max_new_tokens=args.max_new_tokens, eos_id=-1)

    start = time.perf_counter()
    ours_out = run_ours()
    ours_first = time.perf_counter() - start
    ours_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_ours()
        ours_times.append(time.perf_counter() - start)

    # transformers: left padding with an attention mask, the usual batched-generation setup.
    if args.dtype == "bfloat16":
        hf_model = hf_model.to(torch.bfloat16)
    width = max(lengths)
    ids = torch.zeros((args.batch, width), dtype=torch.long)
    mask = torch.zeros((args.batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1

    def run_hf():
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
            )
        return out[:, width:].tolist()

    hf_out = run_hf()  # warm-up
    hf_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_hf()
        hf_times.append(time.perf_counter() - start)

    agree = float(np.mean(np.asarray(ours_out) == np.asarray(hf_out)))
    result = {
        "model": f"llama d{args.d_model} x{args.n_layers} vocab {args.vocab} ({cfg.num_params / 1e6:.1f}M params)",
        "batch": args.batch, "prompt_lengths": [int(n) for n in lengths], "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype, "device": str(jax.devices()[0]),
        "flan_jax_tokens_per_sec": new_tokens / min(ours_times),
        "flan_jax_first_call_sec": ours_first,
        "transformers_tokens_per_sec": new_tokens / min(hf_times),
        "speedup": min(hf_times) / min(ours_times),
        "greedy_token_agreement": agree,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
