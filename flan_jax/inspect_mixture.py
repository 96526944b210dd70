# `python -m flan_jax.inspect_mixture`: the documented command. The tool is flan_jax/cli/inspect_mixture.py; its docstring
# (imported below) is what `--help` prints.
from flan_jax.cli.inspect_mixture import __doc__, run  # noqa: F401

if __name__ == "__main__":
    run()
