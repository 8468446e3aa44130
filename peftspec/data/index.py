"""An offset index over JSON Lines files: any record by its number, the files left on disk.

A training run over a big file (:mod:`peftspec.data.stream`) needs the
records in a seeded order without holding them: :meth:`RecordIndex.build`
reads each file once, in chunks, and keeps only where each line starts, how
long it is and its line number (16 bytes a record: 32 MB for two million
records); the same pass computes the files' SHA-256
(:func:`peftspec.data.reading.digest`'s value, so a resumed run checks it as
before). :meth:`RecordIndex.record` then reads one line with ``os.pread``
(thread-safe: no shared file position), decodes it and says where it came
from (``FILE:LINE``). A line that is empty is not a record; one that is only
whitespace reads as ``None``.

Only JSON Lines can be indexed this way (one record a line). The index does
not parse records; :meth:`peftspec.data.stream.Records.check` parses each
once before training.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peftspec.data.readers import decode_json
from peftspec.data.records import DataError

CHUNK = 16 << 20   # bytes read at a time while indexing
_OPEN_MAX = 64     # file descriptors kept open at once


@dataclass
class _File:
    path: Path
    starts: torch.Tensor   # int64: byte offset of each record's line
    lengths: torch.Tensor  # int32: its length in bytes, the newline excluded
    lines: torch.Tensor    # int32: its line number, from 1

    def __len__(self) -> int:
        return int(self.starts.numel())


def _index_file(path: Path, h, buf: bytearray) -> _File:
    """One pass over ``path``: its lines' offsets (``h`` is fed the bytes)."""
    ends, base, last = [], 0, b""
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                view = memoryview(buf)[:n]
                h.update(view)
                t = torch.frombuffer(buf, dtype=torch.uint8, count=n)
                ends.append((t == 10).nonzero().flatten() + base)
                last = bytes(view[-1:])
                base += n
    except OSError as exc:
        raise DataError(f"{path}: cannot read data file: {exc}") from None
    end = torch.cat(ends) if ends else torch.zeros(0, dtype=torch.long)
    if base and last != b"\n":
        end = torch.cat([end, torch.tensor([base])])  # a last line without its newline
    start = torch.cat([torch.zeros(1, dtype=torch.long), end[:-1] + 1]) if end.numel() else end
    length = end - start
    keep = length > 0  # an empty line is no record (a whitespace-only one reads as None)
    if end.numel() >= 2 ** 31:
        raise DataError(f"{path}: more than 2**31 lines; split the file")
    lines = (torch.arange(1, end.numel() + 1, dtype=torch.int32))[keep]
    return _File(path, start[keep].clone(), length[keep].to(torch.int32), lines)


class RecordIndex:
    """Where every record of some JSON Lines files is; see the module's docstring."""

    def __init__(self, files: list[_File], digest: str, nbytes: int, seconds: float = 0.0):
        self.files, self.digest, self.nbytes, self.seconds = files, digest, nbytes, seconds
        self._first = []  # the first record number of each file
        total = 0
        for f in files:
            self._first.append(total)
            total += len(f)
        self._len = total
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def build(cls, paths: list[Path]) -> "RecordIndex":
        """Index ``paths`` (JSON Lines files) in one pass each."""
        t0 = time.perf_counter()
        buf = bytearray(CHUNK)
        single = len(paths) == 1
        h = hashlib.sha256()
        files, nbytes = [], 0
        for path in paths:
            path = Path(path)
            if not path.is_file():
                raise DataError(f"{path}: no such data file")
            if not single:  # the digest of several files, as reading.digest computes it
                h.update(str(path.name).encode() + b"\0")
            files.append(_index_file(path, h, buf))
            nbytes += path.stat().st_size
        return cls(files, h.hexdigest(), nbytes, time.perf_counter() - t0)

    def __len__(self) -> int:
        return self._len

    @property
    def memory(self) -> int:
        """Bytes the index holds."""
        return sum(t.numel() * t.element_size() for f in self.files
                   for t in (f.starts, f.lengths, f.lines))

    def _fd(self, k: int) -> int:
        with self._lock:
            fd = self._fds.get(k)
            if fd is None:
                if len(self._fds) >= _OPEN_MAX:
                    self.close()
                try:
                    fd = os.open(self.files[k].path, os.O_RDONLY)
                except OSError as exc:
                    raise DataError(f"{self.files[k].path}: cannot read data file: "
                                    f"{exc}") from None
                self._fds[k] = fd
            return fd

    def number_of(self, file: int, line: int) -> int:
        """The record number of line ``line`` (from 1) of file ``file``."""
        f = self.files[file]
        i = int(torch.searchsorted(f.lines, torch.tensor([line], dtype=torch.int32)))
        if i >= len(f) or int(f.lines[i]) != line:
            raise DataError(f"{f.path}:{line}: not a record of the index (the file changed "
                            "since it was indexed?)")
        return self._first[file] + i

    def record(self, number: int) -> tuple[str, object]:
        """``(where, value)`` of record ``number``: its JSON value, a
        :class:`~peftspec.data.readers.Bad` if it is not JSON, or None for a
        line of whitespace. A line that is not UTF-8 is a DataError, as
        :func:`peftspec.data.readers.records` makes it."""
        if not 0 <= number < self._len:
            raise IndexError(number)
        k = bisect.bisect_right(self._first, number) - 1
        f, i = self.files[k], number - self._first[k]
        where = f"{f.path}:{int(f.lines[i])}"
        length = int(f.lengths[i])
        raw = os.pread(self._fd(k), length, int(f.starts[i]))
        if len(raw) != length:
            raise DataError(f"{where}: the file changed while training read it (it is "
                            "shorter than when it was indexed); do not edit data mid-run")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 text: {exc}") from None
        if not text.strip():
            return where, None
        return where, decode_json(where, text.rstrip("\r"))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
