"""The embedded demo's config: a tiny Llama-style model tuned on the built-in synthetic FLAN mixture.

    python -m flan_jax.train --config=configs/demo.py --workdir=/tmp/demo

Its fields are in `flan_jax/cli/demo_config.py`, inside the package, because `python -m flan_jax.demo`
must also run from an installed flan_jax without this repository; this file re-exports it so that
`--config=configs/demo.py` works like every other experiment config. To start an experiment of
your own from it, copy that file here.
"""

from flan_jax.cli.demo_config import get_config  # noqa: F401
