"""Training batches straight from big JSON Lines files: bounded memory, tokenized ahead.

Reading a whole file before the first step costs time and memory in
proportion to the file: on SmolLM2's tokenizer this machine renders and
encodes about 1.2 MB of chat JSONL a second, so a 2 GB file would take half
an hour and several GB before training began. A streamed run instead:

* indexes the files (:class:`~peftspec.data.index.RecordIndex`, one pass,
  16 bytes a record) and reads each record when a batch needs it;
* tokenizes on a worker thread, :data:`PREFETCH` batches ahead of the
  optimizer step, so the step never waits for the tokenizer (the tokenizer
  belongs to the worker while training runs);
* keeps the order a pure function of ``(seed, epoch)``: epoch ``e`` visits the
  records in the permutation seeded ``seed * 1_000_003 + e`` (the formula of
  :class:`~peftspec.data.examples.Batches`), and a batch takes the next
  ``batch_size`` records that encode to something (one that truncation drops
  is replaced by the next). The position after a batch is ``(epoch, cursor)``,
  with a third number under packing, and ``--resume`` restarts exactly there;
* with packing, packs each :data:`WINDOW` consecutive records of the
  permutation together (first fit, seeded by the window), so the rows are
  again a function of ``(seed, epoch)`` and a resumed run repacks the window
  it stopped in the same way.

Before the first step every record is parsed once, without tokenizing
(:meth:`Records.check`, about 37 MB/s here), so bad records are reported as a whole
read reports them and nothing trains on a half-read file. What tokenizing
decides (truncated, dropped) is counted as the records are read and
reported at the end of the run, not before it.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from peftspec.data import readers
from peftspec.data.encoding import Counts, encode_one
from peftspec.data.index import RecordIndex
from peftspec.data.reading import SHOWN
from peftspec.data.packing import Batch, pack
from peftspec.data.records import DataError, Example, parse

STREAM_ABOVE = 256 << 20  # streaming = "auto": JSON Lines data larger than this streams
WINDOW = 2048             # records packed together (packing)
PREFETCH = 8              # batches tokenized ahead of the step
MODES = ("auto", "on", "off")


def wanted(data, mode: str) -> list[Path] | None:
    """The files to stream when ``mode`` (``streaming``) says so, else None.

    ``"on"``: stream, and every file must be JSON Lines; ``"off"``: never;
    ``"auto"``: when every file is JSON Lines and together they are larger
    than :data:`STREAM_ABOVE`."""
    if mode not in MODES:
        raise ValueError(f"streaming must be one of {', '.join(MODES)}")
    if mode == "off" or not data:
        return None
    paths = readers.expand(data)
    formats = {p: readers.format_of(p) if p.exists() else "missing" for p in paths}
    others = [p for p, fmt in formats.items() if fmt != "jsonl"]
    if mode == "on":
        if others:
            p = others[0]
            raise DataError(f"{p}: streaming reads JSON Lines files (one record a line); this "
                            f"is {formats[p]}. Read it whole (streaming = \"off\"), or write "
                            "it as .jsonl")
        return paths
    if others:
        return None
    return paths if sum(p.stat().st_size for p in paths) > STREAM_ABOVE else None


def split_numbers(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, list[int]]:
    """The record numbers ``0 .. n-1`` that train and those held out: the
    choice :func:`peftspec.data.examples.split` makes of ``n`` items, without
    lists of ``n`` numbers."""
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"eval_split {fraction} leaves no training examples ({n} in all)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[-k:]] = False
    return torch.arange(n)[keep], sorted(order[-k:].tolist())


class Records:
    """Read, check and encode the records of an index, one at a time."""

    def __init__(self, index: RecordIndex, *, skip_bad: bool = False):
        self.index, self.skip_bad = index, skip_bad
        self.problems: list[str] = []  # the first few bad records skipped
        self.bad: set[int] = set()     # the numbers of bad records (check, skip_bad)
        self.checked_seconds = 0.0
        self.first: Example | None = None  # the first good record (what decides the task)

    def check(self) -> int:
        """Parse every record once, without tokenizing (about 37 MB/s here):
        the bad ones are reported before anything trains, the first
        :data:`~peftspec.data.reading.SHOWN` with the total, exactly as a whole
        read reports them; under ``skip_bad`` they are remembered and left out.
        Returns how many were bad; :attr:`first` is then the first good record."""
        t0 = time.perf_counter()
        first = None
        for k, f in enumerate(self.index.files):
            for where, value in readers.records(f.path):  # in order: faster than by number
                try:
                    if isinstance(value, readers.Bad):
                        raise DataError(value.message)
                    ex = parse(value, where)
                except DataError as exc:
                    self.bad.add(self.index.number_of(k, int(where.rpartition(":")[2])))
                    if len(self.problems) < SHOWN:
                        self.problems.append(str(exc))
                    continue
                if first is None:
                    first = ex
                elif (ex.label is None) != (first.label is None):
                    raise DataError(f"{ex.where}: {ex.kind} record, but {first.where} is a "
                                    f"{first.kind} record; the data holds classification "
                                    "records or language modelling records, not both")
        self.checked_seconds = time.perf_counter() - t0
        self.first = first
        bad = len(self.bad)
        if bad and not self.skip_bad:
            more = f"\n  ... and {bad - len(self.problems)} more" if bad > len(self.problems) \
                else ""
            raise DataError(f"{bad} bad record(s); nothing was trained on. Fix them, or skip "
                            "them with --skip-bad-records (skip_bad_records = true):\n  " +
                            "\n  ".join(self.problems) + more)
        if first is None:
            raise DataError(f"{', '.join(str(f.path) for f in self.index.files)}: no examples "
                            "in the data" + (f" ({bad} bad record(s) skipped)" if bad else ""))
        return bad

    def example(self, number: int, counts: Counts | None = None) -> Example | None:
        """Record ``number`` as an :class:`Example`; None for a blank line or a
        bad record skipped (counted in ``counts.skipped_bad``)."""
        if number in self.bad:  # found by check(), left out under skip_bad
            if counts is not None:
                counts.skipped_bad += 1
            return None
        where, value = self.index.record(number)
        if value is None:
            return None
        try:
            if isinstance(value, readers.Bad):
                raise DataError(value.message)
            return parse(value, where)
        except DataError as exc:
            if not self.skip_bad:
                raise
            if counts is not None:
                counts.skipped_bad += 1
            if len(self.problems) < SHOWN:
                self.problems.append(str(exc))
            return None


Encode = Callable[[Example, Counts], "tuple[list[int], list[int]] | None"]


def encoder(tok, max_length: int, *, loss_on: str, truncation: str) -> Encode:
    """The encoding of a language modelling example, as a run sets it."""
    def encode(ex: Example, counts: Counts):
        return encode_one(ex, tok, max_length, counts, loss_on=loss_on, truncation=truncation)
    return encode


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class StreamBatches:
    """Micro-batches from :class:`Records` in a seeded order per epoch,
    tokenized ahead on a worker thread; resumable from :meth:`position`.

    ``numbers`` are the record numbers that train (all of them, or what an
    eval split leaves); ``collate`` and ``pad_id`` as for
    :class:`~peftspec.data.examples.Batches`."""

    def __init__(self, records: Records, numbers: torch.Tensor | None, encode: Encode, *,
                 batch_size: int, pad_id: int, seed: int, collate, packing: bool = False,
                 max_length: int = 0, window: int = WINDOW, prefetch: int = PREFETCH):
        self.records, self.encode, self.collate = records, encode, collate
        self.numbers = numbers
        self.n = len(records.index) if numbers is None else int(numbers.numel())
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.packing, self.max_length, self.window = packing, max_length, window
        self.prefetch = prefetch
        self.counts = Counts(lengths=None)  # of what the batches taken so far read
        self.epoch, self.cursor, self.done = 0, 0, 0
        self._per_epoch: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None

    # -- order -------------------------------------------------------------
    def _perm(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def _number(self, perm: torch.Tensor, k: int) -> int:
        j = int(perm[k])
        return j if self.numbers is None else int(self.numbers[j])

    def _item(self, perm, k: int, counts: Counts):
        ex = self.records.example(self._number(perm, k), counts)
        return None if ex is None else self.encode(ex, counts)

    def _window_rows(self, epoch: int, perm, start: int, counts: Counts) -> list:
        end = min(start + self.window, self.n)
        items = [it for it in (self._item(perm, k, counts) for k in range(start, end))
                 if it is not None]
        seed = (self.seed * 1_000_003 + epoch) * 1_000_033 + start
        return pack(items, self.max_length, seed % (2 ** 62)) if items else []

    @property
    def per_epoch(self) -> int:
        """Batches an epoch takes: ``ceil(records / batch_size)``; with packing,
        an estimate from the first window's rows (exact when one window holds
        every record)."""
        if self._per_epoch is None:
            if not self.packing:
                self._per_epoch = -(-self.n // self.batch_size)
            else:
                rows = len(self._window_rows(0, self._perm(0), 0, Counts(lengths=None)))
                seen = min(self.window, self.n)
                self._per_epoch = max(1, -(-(rows * self.n) // (seen * self.batch_size)))
        return self._per_epoch

    def _produce(self, epoch: int, cursor: int, done: int) -> Iterator:
        """``(batch, position after it, counts of what it read)``, forever."""
        start_of_epoch = cursor == 0 and done == 0
        pending = Counts(lengths=None)
        while True:
            yielded = False
            perm = self._perm(epoch)
            while cursor < self.n:
                if self.packing:
                    rows = self._window_rows(epoch, perm, cursor, pending)
                    end = min(cursor + self.window, self.n)
                    groups = [rows[i:i + self.batch_size]
                              for i in range(0, len(rows), self.batch_size)]
                    for k in range(done, len(groups)):
                        after = {"epoch": epoch, "cursor": cursor, "batch": k + 1} \
                            if k + 1 < len(groups) else {"epoch": epoch, "cursor": end,
                                                         "batch": 0}
                        yield self.collate(groups[k], self.pad_id), after, pending
                        pending, yielded = Counts(lengths=None), True
                    cursor, done = end, 0
                    continue
                items = []
                while cursor < self.n and len(items) < self.batch_size:
                    item = self._item(perm, cursor, pending)
                    cursor += 1
                    if item is not None:
                        items.append(item)
                if items:
                    yield (self.collate(items, self.pad_id),
                           {"epoch": epoch, "cursor": cursor, "batch": 0}, pending)
                    pending, yielded = Counts(lengths=None), True
            if not yielded and start_of_epoch:  # a whole epoch, and not one example
                raise DataError(f"{', '.join(str(f.path) for f in self.records.index.files)}: "
                                "no example has a token to learn from within max_length "
                                f"(of {pending.records} records read, {pending.dropped} "
                                "dropped by truncation, "
                                f"{pending.skipped_bad} bad ones skipped)")
            epoch, cursor, done, start_of_epoch = epoch + 1, 0, 0, True

    # -- the worker ----------------------------------------------------------
    def _work(self, start: dict, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for out in self._produce(start["epoch"], start["cursor"], start["batch"]):
                while not stop.is_set():
                    try:
                        q.put(out, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(_Failed(exc))

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._work, args=(self.position(), self._queue,
                                                                 self._stop),
                                        name="peftspec-data", daemon=True)
        self._thread.start()

    def next(self) -> Batch:
        if self._thread is None:
            self._start()
        while True:
            try:
                out = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise DataError("the data worker stopped without a batch") from None
        if isinstance(out, _Failed):
            self.close()
            raise out.exc
        batch, after, counts = out
        self.counts.add(counts)
        self.epoch, self.cursor, self.done = after["epoch"], after["cursor"], after["batch"]
        return batch

    def close(self) -> None:
        """Stop the worker (what it read ahead is dropped; :meth:`position` is
        that of the last batch taken)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None

    # -- where it is -------------------------------------------------------
    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.cursor / self.n

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "batch": self.done}

    def seek(self, position: dict[str, int]) -> None:
        if set(position) != {"epoch", "cursor", "batch"}:
            raise DataError(f"a data position {position} is not a streamed run's; resume "
                            "with the streaming setting the checkpoint was written with")
        self.close()
        self.epoch, self.cursor, self.done = (int(position["epoch"]), int(position["cursor"]),
                                              int(position["batch"]))

    def sample(self, k: int) -> list:
        """The first ``k`` records of epoch 0's order, encoded (a method's data
        initialisation, such as EVA); read here, not by the worker."""
        perm, counts, items = self._perm(0), Counts(lengths=None), []
        for j in range(min(k, self.n)):
            item = self._item(perm, j, counts)
            if item is not None:
                items.append(item)
        return items

