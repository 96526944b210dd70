"""Command line: `python -m flan_jax.convert --from_hf=HF_DIR|--from_gguf=FILE --out=OUT_DIR` or `--to_hf=...`."""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flan_jax.convert",
        description="Convert Hugging Face safetensors checkpoints and GGUF files to flan_jax, and back to HF.",
    )
    parser.add_argument("--from_hf", help="Hugging Face model folder (config.json + *.safetensors, or one .gguf)")
    parser.add_argument("--from_gguf", help="a GGUF file (llama.cpp): dequantised to float32, with its tokenizer")
    parser.add_argument("--skip_tokenizer", action="store_true",
                        help="with --from_gguf: convert the weights only (for a tokenizer kind we do not rebuild)")
    parser.add_argument("--out", help="with --from_hf/--from_gguf: the converted checkpoint folder to write (for checkpoint.init_from)")
    parser.add_argument("--to_hf", help="Hugging Face folder to write (config.json + model.safetensors)")
    parser.add_argument("--workdir", help="with --to_hf: a training run's workdir")
    parser.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step (default: newest)")
    parser.add_argument("--checkpoint", help="with --to_hf: a converted checkpoint folder")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="with --to_hf: dtype of the written tensors (default: the parameters' dtype)")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.from_hf, args.from_gguf, args.to_hf))) != 1:
        parser.error("give exactly one of --from_hf, --from_gguf or --to_hf")
    if (args.from_hf or args.from_gguf) and not args.out:
        parser.error("--from_hf and --from_gguf need --out")
    if args.to_hf and bool(args.workdir) == bool(args.checkpoint):
        parser.error("--to_hf needs exactly one of --workdir or --checkpoint")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # user errors: the message says what to do
        print(f"python -m flan_jax.convert: error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from flan_jax import convert

    if args.from_hf or args.from_gguf:
        if args.from_gguf:
            cfg = convert.convert_from_gguf(args.from_gguf, args.out, tokenizer=not args.skip_tokenizer)
        else:
            cfg = convert.convert_from_hf(args.from_hf, args.out)
        lines = (pathlib.Path(args.out) / convert.checkpoint.OVERRIDES).read_text().splitlines()
        print(f"Wrote {args.out} ({cfg.family}, {cfg.num_params:,} parameters). To train from it, "
              "set in your experiment config (also saved in config_overrides.py.txt):")
        print("\n".join("    " + line for line in lines))
    elif args.workdir:
        step = convert.convert_workdir_to_hf(args.workdir, args.to_hf, step=args.step, dtype=args.dtype)
        print(f"Wrote {args.to_hf} from {args.workdir} step {step}")
    else:
        convert.convert_checkpoint_to_hf(args.checkpoint, args.to_hf, dtype=args.dtype)
        print(f"Wrote {args.to_hf} from {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
