"""The demo's preference stage: DPO of the tuned demo model on the synthetic verifiable pairs.

Starts from the SFT demo run (`make demo` or `python -m flan_jax.train --config=configs/demo.py
--workdir=workdirs/demo`); the argument after the colon is that workdir (its newest checkpoint
and its tokenizer are used):

    python -m flan_jax.train --config=configs/dpo_demo.py:workdirs/demo --workdir=workdirs/demo_dpo

Its fields are in `flan_jax/cli/dpo_demo_config.py`, inside the package (the demo runs from an
installed flan_jax too); this file re-exports it like configs/demo.py.
"""

from flan_jax.cli.dpo_demo_config import get_config  # noqa: F401
