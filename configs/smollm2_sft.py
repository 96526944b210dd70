"""Fine-tune a real pretrained model: SmolLM2-135M-Instruct, prompted with its own chat template.

    python -m flan_jax.train --config=configs/smollm2_sft.py[:mixture=synthetic,checkpoint=DIR] --workdir=DIR

Its fields (and how to get the weights) are in `flan_jax/cli/smollm2_sft_config.py`, inside the
package, because `python -m flan_jax.demo --real` also uses it from an installed flan_jax; this
file re-exports it so that `--config=configs/smollm2_sft.py` works like every other experiment
config.
"""

from flan_jax.cli.smollm2_sft_config import get_config, parse_argument  # noqa: F401
