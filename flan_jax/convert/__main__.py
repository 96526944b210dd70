"""Command line: `python -m flan_jax.convert --from_hf=HF_DIR|--from_gguf=FILE --out=OUT_DIR`, `--to_hf=...`,
`--to_peft=...` or `--from_peft=...`."""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flan_jax.convert",
        description="Convert Hugging Face safetensors checkpoints and GGUF files to flan_jax and back to HF; "
                    "LoRA adapters to and from PEFT.",
    )
    parser.add_argument("--from_hf", help="Hugging Face model folder (config.json + *.safetensors, or one .gguf)")
    parser.add_argument("--from_gguf", help="a GGUF file (llama.cpp): dequantised to float32, with its tokenizer")
    parser.add_argument("--skip_tokenizer", action="store_true",
                        help="with --from_gguf: convert the weights only (for a tokenizer kind we do not rebuild)")
    parser.add_argument("--out", help="with --from_hf/--from_gguf: the converted checkpoint folder to write (for checkpoint.init_from)")
    parser.add_argument("--to_hf", help="Hugging Face folder to write (config.json + model.safetensors); "
                        "a LoRA run's adapters are merged into the weights")
    parser.add_argument("--to_peft", help="with --workdir of a LoRA run: the PEFT adapter folder to write "
                        "(adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--from_peft", help="a PEFT LoRA adapter folder to check against --checkpoint (its base); "
                        "with --out also writes the merged model as a converted checkpoint")
    parser.add_argument("--workdir", help="with --to_hf / --to_peft: a training run's workdir")
    parser.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step (default: newest)")
    parser.add_argument("--checkpoint", help="with --to_hf: a converted checkpoint folder; with --from_peft: the adapter's base")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="with --to_hf: dtype of the written tensors (default: the parameters' dtype)")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.from_hf, args.from_gguf, args.to_hf, args.to_peft, args.from_peft))) != 1:
        parser.error("give exactly one of --from_hf, --from_gguf, --to_hf, --to_peft or --from_peft")
    if (args.from_hf or args.from_gguf) and not args.out:
        parser.error("--from_hf and --from_gguf need --out")
    if args.to_hf and bool(args.workdir) == bool(args.checkpoint):
        parser.error("--to_hf needs exactly one of --workdir or --checkpoint")
    if args.to_peft and not args.workdir:
        parser.error("--to_peft needs --workdir (a LoRA training run)")
    if args.from_peft and not args.checkpoint:
        parser.error("--from_peft needs --checkpoint (the converted base the adapter was trained on)")
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
    elif args.to_peft:
        from flan_jax.convert import peft

        step = peft.convert_workdir_to_peft(args.workdir, args.to_peft, step=args.step)
        print(f"Wrote the PEFT adapter {args.to_peft} from {args.workdir} step {step}; load it with "
              "peft.PeftModel.from_pretrained(<the base exported with --to_hf --checkpoint>, path)")
    elif args.from_peft:
        from flan_jax.convert import peft

        lines = peft.convert_from_peft(args.from_peft, args.checkpoint, args.out, dtype=args.dtype)
        if args.out:
            print(f"Wrote {args.out}: {args.checkpoint} with the adapter {args.from_peft} merged in")
        print("The adapter fits its base. To continue LoRA training from it, set in your experiment config:")
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
