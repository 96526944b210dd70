"""Errors of the data stage, worded for the person who has to fix the data.

Every error says where the problem is (file, line or record number, field) so a user can open the
file at that spot; `DataUnavailableError` is separate because "the data is not on this machine" is
an expected situation (tests turn it into a skip) rather than a bug in the data.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data or a bad task definition. The message names file, line/record and field when known."""

    def __init__(
        self,
        message: str,
        *,
        file: object = None,
        line: int | None = None,
        record: int | None = None,
        field: str | None = None,
        task: str | None = None,
        template: str | None = None,
    ):
        self.file = None if file is None else str(file)
        self.line = line
        self.record = record
        self.field = field
        self.task = task
        self.template = template
        where = []
        if task is not None:
            where.append(f"task {task!r}")
        if template is not None:
            where.append(f"template {template!r}")
        if self.file is not None:
            where.append(self.file if line is None else f"{self.file}:{line}")
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        self.bare_message = message
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class DataUnavailableError(DataError, FileNotFoundError):
    """The data files a source needs are not on this machine (or FLAN_JAX_DATA_DIR is unset)."""
