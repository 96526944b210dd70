# `python -m flan_jax.evaluate`: the documented command. The tool is flan_jax/cli/evaluate.py; its docstring
# (imported below) is what `--help` prints.
from flan_jax.cli.evaluate import __doc__, run  # noqa: F401

if __name__ == "__main__":
    run()
