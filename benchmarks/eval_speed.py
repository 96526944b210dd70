"""How long the demo's evaluation takes: config.eval.mixtures of configs/demo.py on the demo-sized model.

    python benchmarks/eval_speed.py [--examples_per_task=40] [--max_new_tokens=32]

A randomly initialised model never emits EOS, so every prompt decodes the full `max_new_tokens`:
this is the worst case of the demo's evaluation at step 0. Prints the number of tasks and
examples, and the seconds of the first call (compilation included) and of a second call.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples_per_task", type=int, default=40)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=0, help="eval batch size (0: the demo config's)")
    args = parser.parse_args()

    from flax import nnx

    from flan_jax import data, model as fm
    from flan_jax.data.tokenizer import load_tokenizer
    from flan_jax.eval import evaluate

    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    data.import_task_modules(config.data.task_modules)
    config.eval.max_examples_per_task = args.examples_per_task
    config.eval.max_new_tokens = args.max_new_tokens
    if args.batch_size:
        config.eval.batch_size = args.batch_size

    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = load_tokenizer(config.data, workdir=workdir)
        model = fm.Transformer(fm.ModelConfig.from_config(config.model), rngs=nnx.Rngs(0))
        for attempt in ("first (with compilation)", "second"):
            start = time.perf_counter()
            results = evaluate(model, tokenizer, config, workdir=workdir, step=0)
            seconds = time.perf_counter() - start
            examples = sum(t["num_examples"] for t in results["tasks"].values())
            print(f"{attempt}: {len(results['tasks'])} tasks, {examples} examples, "
                  f"batch {config.eval.batch_size}, {config.eval.max_new_tokens} new tokens: {seconds:.1f}s")


if __name__ == "__main__":
    main()
