"""Data files into records: ``(where, object)`` pairs, whatever the format.

By suffix (or, for a folder, by what it holds):

* ``.jsonl`` / ``.ndjson`` (and any other suffix): one JSON object a line, blank
  lines skipped; ``where`` is ``FILE:LINE``;
* ``.json``: one JSON array of objects; ``FILE: item N``;
* ``.csv`` / ``.tsv``: a header row naming the keys (``text``, ``prompt``,
  ``completion``, ``label``, ``messages``); a ``messages`` cell (or a
  ``prompt`` / ``completion`` cell starting with ``[``) holds JSON, a ``label``
  of digits is a class id, an empty cell is a missing key; ``FILE:LINE``;
* ``.parquet``, ``.arrow``, and a folder written by ``datasets``'
  ``save_to_disk`` (its ``state.json`` names the Arrow files; of a
  ``DatasetDict`` folder, the ``train`` split, or give the split's folder):
  read with pyarrow, the optional extra ``data``; ``FILE row N``;
* ``.txt``: plain text, one ``{"text"}`` record per paragraph.

Reading streams: a file is never held whole in memory beyond one table batch
(a ``.json`` array, which is one document, excepted).
"""

from __future__ import annotations

import csv
import glob
import json
import os
from pathlib import Path
from typing import Iterator

from peftspec.core.untrusted import BadText, json_loads
from peftspec.data.records import DataError

TABLE_SUFFIXES = (".parquet", ".arrow")
NEEDS_DATA_EXTRA = "needs pyarrow, the optional extra 'data': pip install 'peftspec[data]'"
_BATCH = 1024


def expand(data: str | list[str] | tuple[str, ...]) -> list[Path]:
    """The files ``data`` names: paths and globs (``data/*.jsonl``), in the order
    given, each glob's matches sorted; a glob matching nothing is an error."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    paths: list[Path] = []
    for item in items:
        item = str(item)
        if glob.has_magic(item):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise DataError(f"{item}: no file matches this pattern")
            paths += [Path(p) for p in found]
        else:
            paths.append(Path(item))
    return paths


def format_of(path: Path) -> str:
    """The format name of ``path``: jsonl, json, csv, tsv, parquet, arrow,
    datasets, txt."""
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    return {".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
            ".arrow": "arrow", ".txt": "txt"}.get(suffix, "jsonl")


def records(path: Path) -> Iterator[tuple[str, object]]:
    """Every record of ``path`` as ``(where, object)``."""
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    fmt = format_of(path)
    reader = {"jsonl": _jsonl, "json": _json_array, "csv": _csv, "tsv": _csv,
              "parquet": _parquet, "arrow": _arrow, "datasets": _datasets, "txt": _txt}[fmt]
    yield from reader(path)


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``, else a DataError naming it as ``what`` (e.g.
    "data file"): the one reader of the user's text inputs."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read {what}: {exc}") from None


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot read data file: {exc}") from None


def decode_json(where: str, text: str):
    """The JSON value of one record's ``text``, or a :class:`Bad` saying where and why not."""
    try:
        return json_loads(text)
    except BadText as exc:
        why = f"{exc.args[0].rsplit(' at line ', 1)[0]} at column {exc.colno}" \
            if exc.colno is not None else str(exc)
        return Bad(f"{where}: not valid JSON ({why})")


class Bad:
    """A record that could not be decoded: parsing it reports ``message``."""

    def __init__(self, message: str):
        self.message = message


def _jsonl(path: Path):
    """Lines end at ``\n`` (a ``\r`` before it is whitespace), as the offset index
    (:mod:`peftspec.data.index`) cuts them."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read data file: {exc}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text: {exc}") from None
            if line.strip():
                where = f"{path}:{lineno}"
                yield where, decode_json(where, line)


def _json_array(path: Path):
    value = decode_json(str(path), read_text(path, "data file"))
    if isinstance(value, Bad):
        raise DataError(value.message)
    if not isinstance(value, list):
        raise DataError(f"{path}: a .json data file is one array of records, got "
                        f"{type(value).__name__} (one object a line is .jsonl)")
    for n, obj in enumerate(value, start=1):
        yield f"{path}: item {n}", obj


def _cell(key: str, value: str):
    if value == "":
        return None
    if key == "messages" or (key in ("prompt", "completion") and value.lstrip().startswith("[")):
        return json.loads(value)
    if key == "label" and value.isdigit():
        return int(value)
    return value


def _csv(path: Path):
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with _open_text(path) as f:
        try:
            reader = csv.DictReader(f, delimiter=delimiter)
            if reader.fieldnames is None:
                return
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    yield where, Bad(f"{where}: more cells than the header has columns")
                    continue
                try:
                    obj = {k: v for k, v in ((k, _cell(k, v or "")) for k, v in row.items())
                           if v is not None}
                except (ValueError, RecursionError) as exc:
                    yield where, Bad(f"{where}: a cell that should hold JSON does not: {exc}")
                    continue
                yield where, obj
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text: {exc}") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV: {exc}") from None


def _txt(path: Path):
    raw = read_text(path, "data file")
    for p in raw.replace("\r\n", "\n").split("\n\n"):
        if p.strip():
            yield str(path), {"text": p.strip()}


def _pyarrow(path: Path):
    try:
        import pyarrow  # noqa: F401 - the optional extra 'data'
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading {format_of(path)} {NEEDS_DATA_EXTRA}") from None
    return pyarrow


def _rows(path: Path, batches, start: int = 0):
    n = start
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield f"{path} row {n}", {k: v for k, v in row.items() if v is not None}
    return n


def _parquet(path: Path):
    pa = _pyarrow(path)
    try:
        table = pa.parquet.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    yield from _rows(path, table.iter_batches(batch_size=_BATCH))


def _arrow_batches(pa, path: Path):
    """Record batches of an Arrow IPC file: the stream format (what ``datasets``
    writes), else the file format."""
    try:
        reader = pa.ipc.open_stream(path)
    except (OSError, pa.ArrowException):
        try:
            reader = pa.ipc.open_file(path)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: not a readable Arrow file: {exc}") from None
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


def _arrow(path: Path):
    pa = _pyarrow(path)
    yield from _rows(path, _arrow_batches(pa, path))


def _datasets(path: Path):
    if (path / "dataset_dict.json").is_file():
        splits = _json_file(path / "dataset_dict.json").get("splits", [])
        if "train" not in splits:
            raise DataError(f"{path}: a DatasetDict folder without a 'train' split "
                            f"(splits: {', '.join(map(str, splits)) or 'none'}); give the "
                            f"split's folder, e.g. {path / str(splits[0]) if splits else path}")
        path = path / "train"
    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk "
                        "(no state.json); give a data file, or the folder save_to_disk wrote")
    files = [f.get("filename") for f in _json_file(state).get("_data_files", [])]
    if not files or not all(isinstance(f, str) and "/" not in f and f != ".." for f in files):
        raise DataError(f"{state}: '_data_files' does not name the folder's Arrow files")
    pa = _pyarrow(path)
    n = 0
    for name in files:
        n = yield from _rows(path, _arrow_batches(pa, path / name), n)


def _json_file(path: Path) -> dict:
    try:
        value = json_loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, BadText) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value
