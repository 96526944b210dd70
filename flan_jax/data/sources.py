"""Data sources: where a task's raw records come from, per split, with random access.

A source turns files (JSONL, JSON, TSV/CSV, a prepared TFDS dataset) or Python code into a sequence
of plain `dict` records per split. Sources are declared when a task is registered but read nothing
until first use, so importing `tasks/` never needs the data on disk; paths may say "{data_dir}",
resolved at load time from `FLAN_JAX_DATA_DIR`. Loaded splits are cached on the source.

Bad input is never dropped silently: a malformed line, undecodable bytes or a missing mapped field
raises `DataError` naming file, line/record and field, unless the source is built with
`on_bad_record="skip"`, in which case skips are counted (`source.skipped`) and summarised with
`logging.warning`. Empty files raise (`on_empty="error"`, the default) or are reported with a
warning and listed in `source.empty_files` (`on_empty="warn"`).

Gzipped files (`*.jsonl.gz`, `*.tsv.gz`, ...) are read directly (flan_jax.data.compressed); a
truncated or corrupt one raises with the file and the first unreadable line.

Line numbers in messages start at 1 (as in an editor); record numbers are 0-based indices into the
file's records (as in Python).
"""

from __future__ import annotations

import abc
import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import pathlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from flan_jax.data import compressed
from flan_jax.data.errors import DataError, DataUnavailableError

DATA_DIR_ENV = "FLAN_JAX_DATA_DIR"
BAD_RECORD_MODES = ("error", "skip")
EMPTY_MODES = ("error", "warn")

_default_on_bad_record = "error"


def data_dir() -> pathlib.Path:
    """The real-data folder, from the environment variable FLAN_JAX_DATA_DIR."""
    value = os.environ.get(DATA_DIR_ENV, "")
    if not value:
        raise DataUnavailableError(
            f"environment variable {DATA_DIR_ENV} is not set; point it at the data folder "
            f"(for example `export {DATA_DIR_ENV}=../shared/data`)"
        )
    path = pathlib.Path(value).expanduser()
    if not path.is_dir():
        raise DataUnavailableError(f"{DATA_DIR_ENV}={value} is not a directory")
    return path


def set_default_on_bad_record(mode: str) -> None:
    """Sets what sources built without `on_bad_record=` do with bad records (config.data.on_bad_record)."""
    global _default_on_bad_record
    _check_choice("on_bad_record", mode, BAD_RECORD_MODES)
    _default_on_bad_record = mode


@contextlib.contextmanager
def default_on_bad_record(mode: str) -> Iterator[None]:
    """`set_default_on_bad_record(mode)` inside the block, the previous default restored after it (the trainer's run)."""
    previous = _default_on_bad_record
    set_default_on_bad_record(mode)
    try:
        yield
    finally:
        set_default_on_bad_record(previous)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {', '.join(map(repr, choices))}")


class Records(Sequence[dict]):
    """A random-access sequence of records with a short deterministic `repr` (grain checkpoints compare it).

    `convert`, when given, is applied on access (used for lazily decoded TFDS records). `origins`
    (file, line, record index in the file) per record lets later stages (preprocessors, templates)
    point at the line of the file a bad record came from.
    """

    def __init__(
        self,
        items: Sequence[Any],
        name: str,
        convert: Callable[[Any], dict] | None = None,
        origins: Sequence[tuple[str, int | None, int]] | None = None,
    ):
        self._items = items
        self._name = name
        self._convert = convert
        self._origins = origins

    def where(self, index: int) -> dict[str, Any]:
        """Location of record `index` as DataError keyword arguments (file, line, record)."""
        if self._origins is None:
            return {"file": self._name, "record": index}
        file, line, record = self._origins[index]
        return {"file": file, "line": line, "record": record}

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        item = self._items[index]
        return item if self._convert is None else self._convert(item)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"Records({self._name}, n={len(self)})"


class PicklableLock:
    """A `_lock` guarding a load-once cache, dropped when pickled and recreated when unpickled.

    grain worker processes receive tasks and sources by pickling, and locks do not pickle.
    """

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class Source(PicklableLock, abc.ABC):
    """Base class: per-split records, loaded on first use and cached."""

    # True when the records are already in this process (nothing to read), so registering a task
    # on this source checks a sample of its records at once (flan_jax.data.checks).
    in_memory = False

    def __init__(self) -> None:
        self._cache: dict[str, Records] = {}
        self._lock = threading.Lock()
        self.skipped: dict[str, int] = {}  # split -> records skipped with on_bad_record="skip"
        self.empty_files: list[str] = []  # files found empty with on_empty="warn"

    @property
    @abc.abstractmethod
    def splits(self) -> tuple[str, ...]:
        """The split names this source can load."""

    @abc.abstractmethod
    def _load(self, split: str) -> Sequence[Any] | Records:
        """Reads one split (called once per split)."""

    def records(self, split: str) -> Records:
        """The records of `split` (a `Records` sequence of dicts); loads and caches on first call."""
        if split not in self.splits:
            raise DataError(f"unknown split {split!r} of {self!r}; available: {', '.join(self.splits)}")
        with self._lock:
            if split not in self._cache:
                loaded = self._load(split)
                if not isinstance(loaded, Records):
                    loaded = Records(loaded, f"{self.short_name()}:{split}")
                self._cache[split] = loaded
            return self._cache[split]

    def num_records(self, split: str) -> int:
        return len(self.records(split))

    def short_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:  # subclasses give a repr that is deterministic across runs
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------- file sources


class _BadRecordLog:
    """Raises on bad records, or counts them (and keeps a few examples) when skipping."""

    def __init__(self, mode: str, source: FileSource, split: str):
        self.mode = mode
        self.source = source
        self.split = split
        self.count = 0
        self.examples: list[str] = []

    def bad(self, error: DataError) -> None:
        if self.mode == "error":
            raise error
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(str(error))

    def finish(self) -> None:
        self.source.skipped[self.split] = self.count
        if self.count:
            logging.warning(
                "%r split %r: skipped %d bad record(s) (on_bad_record='skip'); first: %s",
                self.source, self.split, self.count, " | ".join(self.examples),
            )


class FileSource(Source):
    """Records read from files, one or more per split (paths, glob patterns, "{data_dir}" prefixes)."""

    def __init__(
        self,
        files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
        *,
        field_map: Mapping[str, str] | None = None,
        on_bad_record: str | None = None,
        on_empty: str = "error",
        encoding: str = "utf-8",
    ):
        super().__init__()
        if not files:
            raise ValueError(f"{type(self).__name__} needs at least one split")
        self._files = {
            split: (str(paths),) if isinstance(paths, (str, os.PathLike)) else tuple(map(str, paths))
            for split, paths in files.items()
        }
        self.field_map = dict(field_map or {})
        if on_bad_record is not None:
            _check_choice("on_bad_record", on_bad_record, BAD_RECORD_MODES)
        self._on_bad_record = on_bad_record
        _check_choice("on_empty", on_empty, EMPTY_MODES)
        self.on_empty = on_empty
        self.encoding = encoding

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._files)

    @property
    def on_bad_record(self) -> str:
        return self._on_bad_record or _default_on_bad_record

    def files(self, split: str) -> list[pathlib.Path]:
        """The files of a split, with "{data_dir}" resolved and globs expanded (sorted)."""
        out: list[pathlib.Path] = []
        for pattern in self._files[split]:
            if "{data_dir}" in pattern:
                pattern = pattern.replace("{data_dir}", str(data_dir()))
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise DataUnavailableError(f"no file matches {pattern!r} (split {split!r})")
                out.extend(pathlib.Path(m) for m in matches)
            else:
                path = pathlib.Path(pattern)
                if not path.is_file():
                    raise DataUnavailableError(f"file not found: {pattern} (split {split!r})")
                out.append(path)
        return out

    def _load(self, split: str) -> Records:
        log = _BadRecordLog(self.on_bad_record, self, split)
        records: list[dict] = []
        origins: list[tuple[str, int | None, int]] = []
        for path in self.files(split):
            before, bad_before, file = len(records), log.count, str(path)
            for index, (line, record) in enumerate(self._read(path, log)):
                mapped = self._map_fields(record, path, line, index, log)
                if mapped is not None:
                    records.append(mapped)
                    origins.append((file, line, index))
            if len(records) == before and log.count == bad_before:
                self._report_empty(path, split)
        log.finish()
        return Records(records, f"{self.short_name()}:{split}", origins=origins)

    def _report_empty(self, path: pathlib.Path, split: str) -> None:
        message = f"file has no records (split {split!r} of {self!r})"
        if self.on_empty == "error":
            raise DataError(message + "; build the source with on_empty='warn' to accept it", file=path)
        self.empty_files.append(str(path))
        logging.warning("%s: %s", path, message)

    def _map_fields(self, record: dict, path, line, index, log) -> dict | None:
        if not self.field_map:
            return record
        missing = [old for old in self.field_map.values() if old not in record]
        if missing:
            log.bad(DataError(
                f"missing field (fields present: {', '.join(sorted(record))})",
                file=path, line=line, record=index, field=missing[0],
            ))
            return None
        olds = set(self.field_map.values())
        out = {key: value for key, value in record.items() if key not in olds}
        for new, old in self.field_map.items():
            out[new] = record[old]
        return out

    def _decoded_lines(self, path: pathlib.Path, log: _BadRecordLog) -> Iterator[tuple[int, str]]:
        """(line number, text) for every line; undecodable lines raise or are skipped, with their line."""
        data = compressed.read_bytes(path, log.bad)
        try:
            text = data.decode(self.encoding)
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            if log.mode == "error":
                raise DataError(
                    f"undecodable bytes ({self.encoding}) at byte {error.start}: {error.reason}",
                    file=path, line=line,
                ) from None
            yield from self._decoded_lines_slowly(data, path, log)
            return
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        yield from enumerate(lines, start=1)

    def _decoded_lines_slowly(self, data: bytes, path, log) -> Iterator[tuple[int, str]]:
        raw_lines = data.split(b"\n")
        if raw_lines and raw_lines[-1] == b"":
            raw_lines.pop()
        for number, raw in enumerate(raw_lines, start=1):
            try:
                yield number, raw.decode(self.encoding)
            except UnicodeDecodeError as error:
                log.bad(DataError(f"undecodable bytes ({self.encoding}): {error.reason}", file=path, line=number))

    @abc.abstractmethod
    def _read(self, path: pathlib.Path, log: _BadRecordLog) -> Iterator[tuple[int | None, dict]]:
        """Yields (line number or None, record) for each record of one file."""

    def _repr_args(self) -> str:
        args = [repr(self._files)]
        if self.field_map:
            args.append(f"field_map={self.field_map!r}")
        return ", ".join(args)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"

    def short_name(self) -> str:
        first = next(iter(self._files.values()))[0]
        return f"{type(self).__name__}({os.path.basename(first)})"


class JsonlSource(FileSource):
    """JSON Lines: one JSON object per line; blank lines are ignored."""

    def _read(self, path, log):
        loads = json.loads
        for number, text in self._decoded_lines(path, log):
            if not text.strip():
                continue
            try:
                record = loads(text)
            except json.JSONDecodeError as error:
                log.bad(DataError(f"malformed JSON: {error.msg} (column {error.colno})", file=path, line=number))
                continue
            if not isinstance(record, dict):
                log.bad(DataError(f"expected a JSON object, got {type(record).__name__}", file=path, line=number))
                continue
            yield number, record


class JsonSource(FileSource):
    """A JSON file holding a list of objects, or an object whose `records_key` holds that list."""

    def __init__(self, files, *, records_key: str | None = None, **kwargs):
        super().__init__(files, **kwargs)
        self.records_key = records_key

    def _read(self, path, log):
        text = "\n".join(line for _, line in self._decoded_lines(path, log))
        if not text.strip():
            return
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"malformed JSON: {error.msg} (column {error.colno})", file=path, line=error.lineno) from None
        if self.records_key is not None:
            if not isinstance(document, dict) or self.records_key not in document:
                raise DataError("expected an object with this key holding the records", file=path, field=self.records_key)
            document = document[self.records_key]
        if not isinstance(document, list):
            raise DataError(
                f"expected a JSON list of objects, got {type(document).__name__}"
                + ("" if self.records_key else " (pass records_key= if the list is inside an object)"),
                file=path,
            )
        for index, record in enumerate(document):
            if not isinstance(record, dict):
                log.bad(DataError(f"expected a JSON object, got {type(record).__name__}", file=path, record=index))
                continue
            yield None, record

    def _repr_args(self) -> str:
        extra = f", records_key={self.records_key!r}" if self.records_key else ""
        return super()._repr_args() + extra


class TsvSource(FileSource):
    """Delimited text without quoting (one record per line): a header line or explicit `columns`.

    Values are kept verbatim (no quote processing), which is what the FLAN TSVs need: their fields
    begin with quotation marks that a CSV parser would swallow.
    """

    delimiter = "\t"

    def __init__(self, files, *, columns: Sequence[str] | None = None, header: bool = False, **kwargs):
        super().__init__(files, **kwargs)
        if columns is None and not header:
            raise ValueError(f"{type(self).__name__}: give column names (columns=[...]) or header=True")
        self.columns = tuple(columns) if columns is not None else None
        self.header = header

    def _rows(self, path, log) -> Iterator[tuple[int, list[str]]]:
        delimiter = self.delimiter
        for number, text in self._decoded_lines(path, log):
            text = text.removesuffix("\r")
            if text:
                yield number, text.split(delimiter)

    def _read(self, path, log):
        columns = self.columns
        rows = self._rows(path, log)
        if self.header:
            first = next(rows, None)
            if first is None:
                return
            columns = tuple(first[1]) if columns is None else columns
        for number, values in rows:
            if len(values) != len(columns):
                log.bad(DataError(
                    f"expected {len(columns)} columns ({', '.join(columns)}), found {len(values)}",
                    file=path, line=number,
                ))
                continue
            yield number, dict(zip(columns, values))

    def _repr_args(self) -> str:
        return super()._repr_args() + f", columns={self.columns!r}, header={self.header!r}"


class CsvSource(TsvSource):
    """CSV with standard quoting (fields may contain quoted delimiters and newlines)."""

    delimiter = ","

    def __init__(self, files, *, delimiter: str = ",", **kwargs):
        super().__init__(files, **kwargs)
        self.delimiter = delimiter

    def _rows(self, path, log):
        text = "\n".join(line for _, line in self._decoded_lines(path, log))
        reader = csv.reader(io.StringIO(text), delimiter=self.delimiter)
        try:
            for values in reader:
                if values:
                    yield reader.line_num, values
        except csv.Error as error:
            raise DataError(f"malformed CSV: {error}", file=path, line=reader.line_num) from None


# ---------------------------------------------------------------------------- other sources


class FunctionSource(Source):
    """Records produced by Python functions, one per split: `{"train": make_train, ...}`.

    Each function takes no argument and returns an iterable of dicts; it must be deterministic (the
    built-in synthetic tasks seed their own `random.Random`). Called once per split, on first use.
    """

    def __init__(self, functions: Mapping[str, Callable[[], Iterable[dict]]]):
        super().__init__()
        if not functions:
            raise ValueError("FunctionSource needs at least one split")
        self._functions = dict(functions)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._functions)

    def _load(self, split: str) -> list[dict]:
        records = list(self._functions[split]())
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{self!r} split {split!r} produced a {type(record).__name__}, not a dict", record=index)
        return records

    def __repr__(self) -> str:
        names = {split: f"{fn.__module__}.{getattr(fn, '__qualname__', type(fn).__name__)}" for split, fn in self._functions.items()}
        return f"FunctionSource({names!r})"


class InMemorySource(Source):
    """Records given directly, `{"train": [dict, ...], ...}` (tests, small hand-written tasks)."""

    in_memory = True

    def __init__(self, splits: Mapping[str, Sequence[dict]]):
        super().__init__()
        self._splits = {split: list(records) for split, records in splits.items()}
        digest = hashlib.sha1(json.dumps(self._splits, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self._repr = f"InMemorySource({ {s: len(r) for s, r in self._splits.items()} }, sha1={digest})"

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._splits)

    def _load(self, split: str) -> list[dict]:
        return self._splits[split]

    def __repr__(self) -> str:
        return self._repr


class TfdsSource(Source):
    """A PREPARED TFDS dataset read through `tfds.data_source` (array_record; no TensorFlow, no download).

    Records are decoded on access: bytes become str, numpy scalars become Python values, so they
    render like file records. `field_map` renames fields as for file sources.
    """

    def __init__(
        self,
        name: str,
        *,
        data_dir: str | os.PathLike | None = None,
        splits: Sequence[str] | None = None,
        field_map: Mapping[str, str] | None = None,
    ):
        super().__init__()
        self.name = name
        self._data_dir = None if data_dir is None else str(data_dir)
        self._requested_splits = tuple(splits) if splits is not None else None
        self._splits = self._requested_splits  # discovered from the builder info on first use when None
        self.field_map = dict(field_map or {})

    def _resolved_data_dir(self) -> str | None:
        if self._data_dir is None:
            return None
        value = self._data_dir
        if "{data_dir}" in value:
            value = value.replace("{data_dir}", str(data_dir()))
        return value

    @property
    def splits(self) -> tuple[str, ...]:
        if self._splits is None:
            self._splits = tuple(self._builder().info.splits.keys())
        return self._splits

    def _builder(self):
        import tensorflow_datasets as tfds  # lazy: heavy import, only for TFDS tasks

        try:
            return tfds.builder(self.name, data_dir=self._resolved_data_dir())
        except Exception as error:  # tfds raises several types for "not found / not prepared"
            raise DataUnavailableError(f"TFDS dataset {self.name!r} not found in {self._data_dir}: {error}") from error

    def _load(self, split: str) -> Records:
        import tensorflow_datasets as tfds

        try:
            source = tfds.data_source(self.name, split=split, data_dir=self._resolved_data_dir(), download=False)
        except Exception as error:
            raise DataUnavailableError(
                f"TFDS dataset {self.name!r} split {split!r} is not prepared in {self._data_dir} "
                f"(TfdsSource never downloads): {error}"
            ) from error
        return Records(source, f"tfds:{self.name}:{split}", convert=self._convert)

    def _convert(self, example: Mapping[str, Any]) -> dict:
        record = {key: _to_python(value) for key, value in example.items()}
        for new, old in self.field_map.items():
            if old not in record:
                raise DataError(f"missing field in TFDS dataset {self.name!r}", field=old)
            record[new] = record.pop(old) if new != old else record[old]
        return record

    def __repr__(self) -> str:
        return (
            f"TfdsSource({self.name!r}, data_dir={self._data_dir!r}, splits={self._requested_splits!r}, "
            f"field_map={self.field_map!r})"
        )


def _to_python(value: Any) -> Any:
    """bytes -> str and numpy values -> Python values, recursively (TFDS returns numpy)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, Mapping):
        return {key: _to_python(item) for key, item in value.items()}
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _to_python(value.tolist())
    if isinstance(value, list):
        return [_to_python(item) for item in value]
    return value
