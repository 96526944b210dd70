# `python -m flan_jax.train`: the documented command. The tool is flan_jax/cli/train.py; its docstring
# (imported below) is what `--help` prints.
from flan_jax.cli.train import __doc__, run  # noqa: F401

run()
