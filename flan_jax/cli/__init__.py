"""The command-line tools, one module each; library code lives in the stage packages.

    python -m flan_jax.train            --config=configs/demo.py --workdir=DIR      (cli/train.py)
    python -m flan_jax.evaluate         --workdir=DIR [--config=...] [--step=N]     (cli/evaluate.py)
    python -m flan_jax.inspect_mixture  --mixture=NAME [--render=TASK]               (cli/inspect_mixture.py)
    python -m flan_jax.demo             --workdir=workdirs/demo                      (cli/demo.py)
    python -m flan_jax.convert          --from_hf=HF_DIR --out=OUT                   (convert/__main__.py)

The `python -m flan_jax.<tool>` names are thin shims that call `run()` here. Flags are defined
inside `run()`, not at import, so importing several tools (tests, notebooks) never redefines one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags


def define_main_flags(define: Callable[[], None]) -> None:
    """Runs `define()` (a tool's flag definitions) and lists those flags in `--help`.

    absl's `--help` shows the flags of the `__main__` module; a tool's flags are defined in its
    cli module, so they are registered as key flags of the entry point too.
    """
    before = set(flags.FLAGS)
    define()
    for name in sorted(set(flags.FLAGS) - before):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
