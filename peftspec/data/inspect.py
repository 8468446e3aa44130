"""What a run would train on: ``peftspec data inspect``.

:func:`inspect` reads and encodes the data exactly as ``peftspec train`` does
(the same readers, chat template, ``loss_on``, ``max_length`` and truncation
policy) and counts: records, tokens, scored tokens, the dropped and the
truncated, the formats, the record shapes, the length distribution.
:func:`segments` splits one example into runs of scored and unscored text, so
that a user sees what the loss covers before spending an hour of compute.
"""

from __future__ import annotations

import statistics
from collections import Counter

from peftspec.data import reading
from peftspec.data.encoding import IGNORE, encode_lm, trained_ids


def _distribution(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"min": ordered[0], "median": int(statistics.median(ordered)), "p90": q(0.9),
            "p99": q(0.99), "max": ordered[-1], "mean": round(statistics.fmean(ordered), 1)}


def inspect(data, tok, *, max_length: int, loss_on: str = "assistant",
            truncation: str = "right", skip_bad: bool = False, show: int = 0) -> dict:
    """Counts of ``data`` encoded for training, and ``show`` examples as segments."""
    read = reading.read(data, skip_bad=skip_bad)
    formats = sorted(set(read.formats.values()))
    out = {"format": formats[0] if len(formats) == 1 else "mixed", "files": read.formats,
           "shapes": dict(Counter(ex.shape for ex in read.examples)),
           "max_length": max_length, "loss_on": loss_on, "truncation": truncation,
           "skipped_bad": read.skipped}
    if read.examples[0].label is not None:  # classification: one scored label a record
        lengths = [len(tok.encode_sequence(ex.text, max_length)) for ex in read.examples]
        out.update(records=len(lengths), tokens=sum(lengths), scored_tokens=len(lengths),
                   dropped=0, truncated=sum(n >= max_length for n in lengths),
                   lengths=_distribution(lengths), examples=[])
        return out
    _, counts = encode_lm(read.examples, tok, max_length, loss_on=loss_on,
                          truncation=truncation)
    out.update(records=counts.records, tokens=counts.tokens,
               scored_tokens=counts.scored_tokens, dropped=counts.dropped,
               dropped_unscored=counts.dropped_empty, truncated=counts.truncated,
               lengths=_distribution(counts.lengths))
    out["examples"] = [{"where": ex.where, "segments": segments(ex, tok, max_length,
                                                                loss_on=loss_on)}
                       for ex in read.examples[:show]]
    return out


def segments(example, tok, max_length: int, *, loss_on: str = "assistant"
             ) -> list[tuple[str, bool]]:
    """``example``'s text as ``(text, scored)`` runs, cut where training cuts it
    (the text past ``max_length`` is one last unscored run marked by the caller
    from ``tokens > max_length``)."""
    ids, labels = trained_ids(example, tok, loss_on=loss_on)
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE) \
                or i == max_length:
            runs.append((tok.decode(ids[start:i]), labels[start] != IGNORE and
                         start < max_length))
            start = i
    return runs
