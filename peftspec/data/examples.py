"""Training data: examples into batches (and the labels of a classifier).

Reading files (:mod:`peftspec.data.readers`, :mod:`peftspec.data.reading`),
validating records (:mod:`peftspec.data.records`), rendering conversations
(:mod:`peftspec.data.chat`) and encoding them (:mod:`peftspec.data.encoding`)
have modules of their own; their public names are re-exported here. This
module holds what comes after: the labels of a classification set
(:class:`Labels`), padding into batches (:func:`collate`; padding is masked
out of attention and labelled -100; a classification batch's labels are one
class id per example), the held-out split, and the order of an epoch: a
seeded permutation, a pure function of ``(seed, epoch)``, so a run resumed
from a checkpoint sees the same batches as one never stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

from peftspec.data import reading
from peftspec.data.encoding import IGNORE, encode, encode_lm
from peftspec.data.packing import Batch
from peftspec.data.readers import read_text
from peftspec.data.records import DataError, Example

__all__ = ["IGNORE", "Batch", "DataError", "Example", "Labels", "Batches", "collate", "encode",
           "encode_all", "eval_batches", "file_digest", "read_examples", "read_text",
           "scored", "split"]

MAX_LABELS = 10_000  # integer labels are class ids below this


@dataclass(frozen=True)
class Labels:
    """The classes of a classification data file: ``names[i]`` is class id ``i``.

    String labels get ids in sorted order (``["neg", "pos"]`` -> 0, 1), so the
    mapping depends only on the set of labels; integer labels are their own
    ids (``names`` is ``0 .. max``, ids that never occur included). A file
    uses one type of label. :attr:`names` is what an adapter file records
    (metadata ``labels``) to map a prediction back to its label.
    """

    names: tuple[str | int, ...]
    source: str = ""

    @classmethod
    def of(cls, examples: list[Example], source: str = "") -> "Labels":
        first = next(ex for ex in examples if ex.label is not None)
        is_int = isinstance(first.label, int)
        for ex in examples:
            if isinstance(ex.label, int) != is_int:
                kind = "an integer" if isinstance(ex.label, int) else "a string"
                other = "an integer" if is_int else "a string"
                raise DataError(f"{ex.where}: label {ex.label!r} is {kind}, but {first.where} "
                                f"has {other} label {first.label!r}; use one type of label "
                                "in a file (integer ids, or string names)")
        seen = sorted({ex.label for ex in examples})
        if len(seen) < 2:
            raise DataError(f"{source or first.where}: every record has label {first.label!r}; "
                            "classification needs at least two different labels")
        if is_int:
            if seen[-1] >= MAX_LABELS:
                where = next(ex.where for ex in examples if ex.label == seen[-1])
                raise DataError(f"{where}: label {seen[-1]} would make {seen[-1] + 1} classes "
                                f"(integer labels are class ids, at most {MAX_LABELS - 1}); "
                                "number the classes from 0, or use string labels")
            return cls(tuple(range(seen[-1] + 1)), source)
        return cls(tuple(seen), source)

    def __len__(self) -> int:
        return len(self.names)

    def id(self, label: str | int, where: str = "") -> int:
        """The class id of ``label``; a label the training data lacks is an error."""
        if isinstance(label, int) and self.names and isinstance(self.names[0], int):
            if label < len(self.names):
                return label
        elif isinstance(label, str) and label in self._index:
            return self._index[label]
        shown = ", ".join(map(repr, self.names[:20])) + (", ..." if len(self) > 20 else "")
        raise DataError(f"{where}: label {label!r} is not one of the training data's labels "
                        f"({self.source}: {shown}); a classifier can only predict the "
                        "classes it was trained on")

    @property
    def _index(self) -> dict:
        return {name: i for i, name in enumerate(self.names)}

    def to_json(self) -> str:
        return json.dumps(list(self.names), ensure_ascii=False, separators=(",", ":"))


def read_examples(data, *, skip_bad: bool = False) -> list[Example]:
    """Read and validate every record of ``data`` (a file, a glob, or a list of
    them; :func:`peftspec.data.reading.read`)."""
    return reading.read(data, skip_bad=skip_bad).examples


def encode_all(examples: list[Example], tok, max_length: int, labels: Labels | None = None,
               *, loss_on: str = "assistant", truncation: str = "right"):
    """Encode every example, dropping those with no scored token left after
    truncation (the label of position 0 is never scored: there is no context).

    With ``labels`` (classification), an item is ``(ids, class_id)``, dropped
    only when the text has no token at all."""
    kept, dropped = [], 0
    if labels is not None:
        for ex in examples:
            if ex.label is None:
                raise DataError(f"{ex.where}: not a classification record; the training data "
                                f"({labels.source}) is {{\"text\", \"label\"}} records")
            ids = tok.encode_sequence(ex.text, max_length)
            if not ids:
                dropped += 1
                continue
            kept.append((ids, labels.id(ex.label, ex.where)))
        return kept, dropped
    kept, counts = encode_lm(examples, tok, max_length, loss_on=loss_on, truncation=truncation)
    return kept, counts.dropped


def collate(items: list[tuple[list[int], list[int] | int]], pad_id: int) -> Batch:
    """Right-pad a list of (ids, labels) into input_ids, attention_mask, labels.

    Classification items, (ids, class_id), give labels of shape (batch,)."""
    width = max(len(ids) for ids, _ in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    classify = isinstance(items[0][1], int)
    labels = torch.tensor([lab for _, lab in items], dtype=torch.long) if classify \
        else torch.full((n, width), IGNORE, dtype=torch.long)
    for row, (ids, lab) in enumerate(items):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
        if not classify:
            labels[row, :len(lab)] = torch.tensor(lab)
    batch = Batch(input_ids=input_ids, attention_mask=mask, labels=labels)
    batch.tokens = int(mask.sum())
    return batch


def scored(labels: torch.Tensor, extra: int = 0) -> int:
    """The count a model's mean loss divides by: for a causal LM, labels other
    than -100 after the one-position shift, with ``extra`` ignored positions
    the model prepends itself; for a classifier's ``(batch,)`` labels, the rows."""
    if labels.dim() == 1:
        return int((labels != IGNORE).sum())
    if extra:
        labels = torch.cat([labels.new_full((labels.shape[0], extra), IGNORE), labels], dim=1)
    return int((labels[:, 1:] != IGNORE).sum())


def split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of ``items`` (a seeded choice) for evaluation."""
    if fraction <= 0:
        return items, []
    k = max(1, round(fraction * len(items)))
    if k >= len(items):
        raise DataError(f"eval_split {fraction} leaves no training examples "
                        f"({len(items)} in all)")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[-k:])
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


class Batches:
    """Micro-batches in a seeded order per epoch, resumable from ``(epoch, index)``."""

    def __init__(self, items: list, batch_size: int, pad_id: int, seed: int, *,
                 collate: Callable[[list, int], Batch] = collate):
        self.items, self.batch_size, self.pad_id, self.seed = items, batch_size, pad_id, seed
        self.collate = collate  # packed rows: peftspec.data.packing.collate_packed
        self.per_epoch = -(-len(items) // batch_size)
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.items), generator=gen).tolist()
        return self._order

    def next(self) -> Batch:
        if self.index >= self.per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        chosen = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return self.collate([self.items[i] for i in chosen], self.pad_id)

    @property
    def epoch_progress(self) -> float:
        """Epochs done, with the fraction of this one."""
        return self.epoch + self.index / self.per_epoch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict[str, int]) -> None:
        self.epoch, self.index, self._order = int(position["epoch"]), int(position["index"]), None


def eval_batches(items: list, batch_size: int, pad_id: int):
    """The evaluation set in file order."""
    for start in range(0, len(items), batch_size):
        yield collate(items[start:start + batch_size], pad_id)


def file_digest(data) -> str:
    """SHA-256 of the data files (a resumed run must read the same data)."""
    return reading.digest(data)
