"""Command line: `python -m flan_jax.train --config=configs/demo.py --workdir=DIR [--config.a.b=value ...]`.

Any config field can be overridden with `--config.<section>.<field>=value`; the config is locked,
so a misspelt field stops the command at once with the field name and a suggestion. Re-running
the same command with the same workdir resumes from the latest checkpoint.
Exit status: 0 when done or preempted (SIGTERM: checkpoint saved), 1 on a non-finite loss in
"stop" mode, 2 on a bad command line.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from flan_jax import cli, host_memory

_FLAGS: dict = {}


def define_flags() -> None:
    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, eval results.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with a one-line error for unknown config fields instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)
    except (AttributeError, KeyError) as error:
        overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
        detail = str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        detail = re.sub(r"\s+", " ", detail)
        sys.stderr.write(
            f"error: unknown config field in the overrides {overrides}: {detail}\n"
            "(all fields and their meaning: flan_jax/default_config.py)\n"
        )
        sys.exit(2)


def _quiet_orbax(record: logging.LogRecord) -> bool:
    """Orbax logs every file it renames at INFO; keep its warnings and errors only."""
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config, workdir = _FLAGS["config"].value, _FLAGS["workdir"].value
    if config is None or not workdir:
        raise app.UsageError("--config and --workdir are required")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").addFilter(_quiet_orbax)
    from flan_jax.train import loop

    try:
        loop.train(config, workdir)
    except loop.NonFiniteError as error:
        logging.error("%s", error)
        sys.exit(1)
    print(f"workdir: {workdir}")


def run() -> None:
    host_memory.reexec_with_tuned_malloc()
    cli.define_main_flags(define_flags)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
