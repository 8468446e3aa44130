"""Training data: files into examples, examples into token ids, ids into batches.

Formats:

* JSONL, one object a line: ``{"text": ...}`` for causal language modelling
  (every token scored), or ``{"prompt": ..., "completion": ...}`` where only
  the completion is scored (the prompt's labels are -100). Blank lines are
  skipped; anything else that is not such an object is an error naming the
  file and line.
* ``.txt``: plain text, one example per paragraph (blank-line separated).

Each example ends with the tokenizer's end-of-text token. Examples are
truncated to ``max_length`` tokens and right-padded in a batch (padding is
masked out of attention and labelled -100). The order of an epoch is a seeded
permutation, a pure function of ``(seed, epoch)``, so a run resumed from a
checkpoint sees the same batches as one never stopped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PeftspecError

IGNORE = -100


class DataError(PeftspecError):
    """A data file is missing or malformed (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Example:
    """One record: ``text`` alone, or ``prompt`` + ``completion``."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    where: str = ""


def read_examples(path: str | Path) -> list[Example]:
    """Read and validate every record of ``path`` (JSONL, or ``.txt`` paragraphs)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read data file: {exc}") from None
    if path.suffix == ".txt":
        paras = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
        examples = [Example(text=p, where=f"{path}") for p in paras if p]
    else:
        examples = [_record(path, i, line) for i, line in enumerate(raw.splitlines(), start=1)
                    if line.strip()]
    if not examples:
        raise DataError(f"{path}: no examples in the file")
    return examples


def _record(path: Path, lineno: int, line: str) -> Example:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "label" in obj:
        raise DataError(f"{where}: {{\"text\", \"label\"}} classification records are not "
                        "supported yet; use {\"text\"} or {\"prompt\", \"completion\"}")
    has_text, has_pc = "text" in obj, ("prompt" in obj or "completion" in obj)
    if has_text and has_pc:
        raise DataError(f"{where}: give either 'text' or 'prompt' and 'completion', not both")
    keys = ("text",) if has_text else ("prompt", "completion")
    if not has_text and not has_pc:
        raise DataError(f"{where}: expected a 'text' key, or 'prompt' and 'completion' keys "
                        f"(got {', '.join(map(repr, obj)) or 'no keys'})")
    for key in keys:
        if key not in obj:
            raise DataError(f"{where}: missing key '{key}'")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {obj[key]!r:.40}")
    extra = sorted(set(obj) - set(keys))
    if extra:
        raise DataError(f"{where}: unknown key(s) {', '.join(map(repr, extra))}")
    return Example(**{k: obj[k] for k in keys}, where=where)


def encode(example: Example, tok, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (labels -100 where not scored)."""
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if example.text is not None:
        ids = tok.encode(example.text) + eos
        labels = list(ids)
    else:
        p = tok.encode(example.prompt)
        c = tok.encode(example.completion) + eos
        ids, labels = p + c, [IGNORE] * len(p) + c
    return ids[:max_length], labels[:max_length]


def encode_all(examples: list[Example], tok, max_length: int):
    """Encode every example, dropping those with no scored token left after
    truncation (the label of position 0 is never scored: there is no context)."""
    kept, dropped = [], 0
    for ex in examples:
        ids, labels = encode(ex, tok, max_length)
        if len(ids) < 2 or all(x == IGNORE for x in labels[1:]):
            dropped += 1
            continue
        kept.append((ids, labels))
    return kept, dropped


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (ids, labels) into input_ids, attention_mask, labels."""
    width = max(len(ids) for ids, _ in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for row, (ids, lab) in enumerate(items):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
        labels[row, :len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


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

    def __init__(self, items: list, batch_size: int, pad_id: int, seed: int):
        self.items, self.batch_size, self.pad_id, self.seed = items, batch_size, pad_id, seed
        self.per_epoch = -(-len(items) // batch_size)
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.items), generator=gen).tolist()
        return self._order

    def next(self) -> dict[str, torch.Tensor]:
        if self.index >= self.per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        chosen = order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return collate([self.items[i] for i in chosen], self.pad_id)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict[str, int]) -> None:
        self.epoch, self.index, self._order = int(position["epoch"]), int(position["index"]), None


def eval_batches(items: list, batch_size: int, pad_id: int):
    """The evaluation set in file order."""
    for start in range(0, len(items), batch_size):
        yield collate(items[start:start + batch_size], pad_id)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a data file (a resumed run must read the same data)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
