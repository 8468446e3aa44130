"""Read data files into validated examples, reporting every bad record.

:func:`read` takes a path, a glob or a list of them
(:func:`peftspec.data.readers.expand`), reads each file's records
(:mod:`peftspec.data.readers`) and validates each (:func:`peftspec.data.records.parse`).
A bad record does not stop the reading: the first :data:`SHOWN` are collected
with their place (``FILE:LINE``, ``FILE row N``) and what is wrong, and the
read fails with all of them and the total, so one run shows what to fix.
Nothing trains on a half-read file unless ``skip_bad`` is set, when the bad
records are left out and counted (:attr:`Read.skipped`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from peftspec.data import readers
from peftspec.data.records import DataError, Example, parse

SHOWN = 20


@dataclass
class Read:
    """The examples of one or more files, with what reading them found."""

    examples: list[Example]
    formats: dict[str, str]               # file -> format
    skipped: int = 0                       # bad records left out (skip_bad)
    problems: list[str] = field(default_factory=list)  # the first SHOWN of them


def _kind_of(example: Example) -> str:
    if example.label is not None:
        return 'a classification record {"text", "label"}'
    if example.text is not None:
        return 'a language modelling record {"text"}'
    if example.messages is not None:
        return 'a conversation {"messages"}'
    return 'a language modelling record {"prompt", "completion"}'


def read(data, *, skip_bad: bool = False) -> Read:
    """Read every record of ``data`` (a path, a glob, or a list of them)."""
    paths = readers.expand(data)
    if not paths:
        raise DataError("no data files given")
    examples, formats, problems, bad = [], {}, [], 0
    for path in paths:
        formats[str(path)] = readers.format_of(Path(path))
        for where, obj in readers.records(Path(path)):
            try:
                if isinstance(obj, readers.Bad):
                    raise DataError(obj.message)
                examples.append(parse(obj, where))
            except DataError as exc:
                bad += 1
                if len(problems) < SHOWN:
                    problems.append(str(exc))
    if bad and not skip_bad:
        more = f"\n  ... and {bad - len(problems)} more" if bad > len(problems) else ""
        raise DataError(f"{bad} bad record(s); nothing was trained on. Fix them, or skip them "
                        "with --skip-bad-records (skip_bad_records = true):\n  " +
                        "\n  ".join(problems) + more)
    if not examples:
        raise DataError(f"{', '.join(map(str, paths))}: no examples in the data" +
                        (f" ({bad} bad record(s) skipped)" if bad else ""))
    first = examples[0]
    for ex in examples:
        if ex.kind != first.kind:
            raise DataError(f"{ex.where}: {_kind_of(ex)}, but {first.where} is "
                            f"{_kind_of(first)}; the data holds classification records "
                            "or language modelling records, not both")
    return Read(examples, formats, skipped=bad, problems=problems)


def digest(data) -> str:
    """SHA-256 over the files ``data`` names, in order (a resumed run must read
    the same data); a folder's files in sorted order. One file's digest is the
    SHA-256 of its bytes, as checkpoints written before several files were
    read recorded it."""
    paths = readers.expand(data)
    if len(paths) == 1 and Path(paths[0]).is_file():
        return _sha256(Path(paths[0]), hashlib.sha256()).hexdigest()
    h = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) \
            if Path(path).is_dir() else [Path(path)]
        for f in files:
            h.update(str(f.name).encode() + b"\0")
            _sha256(f, h)
    return h.hexdigest()


def _sha256(path: Path, h):
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h
