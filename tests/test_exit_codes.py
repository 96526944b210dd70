"""Exit statuses: one per kind of failure, as documented, with disk full recognised through causes."""

import errno
import pathlib
import re

from flan_jax.train import exit_codes
from flan_jax.train.exit_codes import ExitCode

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_documented_table_is_the_enum():
    text = (ROOT / "docs" / "training.md").read_text()
    documented = {int(code) for code in re.findall(r"^\| (\d) \| ", text, flags=re.M)}
    assert documented == {int(code) for code in ExitCode}
    assert len({cls.exit_code for cls in exit_codes.RunError.__subclasses__()}) == len(exit_codes.RunError.__subclasses__())


def test_disk_full_is_found_in_the_cause_chain_and_wins():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise exit_codes.CheckpointSaveError("saving step 4 failed") from cause
    except exit_codes.CheckpointSaveError as error:
        assert exit_codes.exit_code_for(error) == ExitCode.DISK_FULL
    assert exit_codes.exit_code_for(RuntimeError("tensorstore: ... No space left on device [os error 28]")) == ExitCode.DISK_FULL
    assert exit_codes.exit_code_for(exit_codes.CheckpointSaveError("timeout")) == ExitCode.SAVE_FAILED
    assert exit_codes.exit_code_for(exit_codes.NonFiniteError("nan")) == ExitCode.NONFINITE == 3
    assert exit_codes.exit_code_for(KeyError("a bug")) == ExitCode.UNEXPECTED == 1
