"""Command line: `python -m flan_jax.train --config=configs/demo.py --workdir=DIR [--config.a.b=value ...]`.

Any config field can be overridden with `--config.<section>.<field>=value`; the config is locked,
so a misspelt field stops the command at once with the field name and a suggestion. Re-running
the same command with the same workdir resumes from the latest checkpoint.
Exit status (flan_jax/train/exit_codes.py): 0 done or preempted (SIGTERM: checkpoint saved),
1 unexpected error (traceback), 2 bad command line, 3 non-finite loss (or "skip" past its limits),
4 no usable checkpoint (all corrupt or unreadable), 5 config differs from the checkpoint's, 6 workdir
locked by another trainer, 7 disk full, 8 checkpoint save failed. Each failure but 1 prints one
message saying what happened and what to do.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from flan_jax import cli, host_memory
from flan_jax.train import preemption

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
    from flan_jax.train import exit_codes, loop

    try:
        loop.train(config, workdir)
    except Exception as error:  # noqa: BLE001 (classified; anything unclassified re-raised with its traceback)
        code = exit_codes.exit_code_for(error)
        if code == exit_codes.ExitCode.UNEXPECTED:
            raise
        prefix = "Disk full: " if code == exit_codes.ExitCode.DISK_FULL else ""
        logging.error("%s%s (exit status %d: %s)", prefix, error, code, code.name)
        sys.exit(int(code))
    print(f"workdir: {workdir}")


def run() -> None:
    host_memory.reexec_with_tuned_malloc()
    preemption.install_early_sigterm_handler()  # before the slow imports: an early SIGTERM exits 0 too
    cli.define_main_flags(define_flags)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
