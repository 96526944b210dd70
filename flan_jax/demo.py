# `python -m flan_jax.demo` (`make demo`): the documented command. The tool is flan_jax/cli/demo.py; its docstring
# (imported below) is what `--help` prints.
from flan_jax.cli.demo import __doc__, run  # noqa: F401

if __name__ == "__main__":
    run()
