"""Examples into token ids and labels, with the truncation policy and its counts.

* ``{"text"}``: the text's tokens and the end-of-text token, every one scored;
* a conversation (``messages``, TRL's conversational prompt-completion) and,
  with a tokenizer that has a chat template, a ``{"prompt", "completion"}``
  record (a user turn and an assistant turn): rendered by the model's chat
  template, scored by ``loss_on`` (:mod:`peftspec.data.chat`);
* ``{"prompt", "completion"}`` without a chat template: the prompt's tokens
  (-100) then the completion's and the end-of-text token.

``truncation`` decides what happens to an example longer than ``max_length``:

* ``"right"`` (the default): keep its first ``max_length`` tokens. The data is
  kept and the cost is bounded; what is cut is counted, and an example whose
  scored tokens are all cut away is dropped and counted, never trained on with
  nothing to learn. It is what TRL and HF do, so a run ported from them sees
  the same tokens;
* ``"drop"``: leave the example out (a cut answer teaches the model to stop
  mid-sentence, and loses the end-of-turn token);
* ``"error"``: stop, naming the first such record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peftspec.data import chat
from peftspec.data.records import DataError, Example

IGNORE = chat.IGNORE
TRUNCATION = ("right", "drop", "error")


@dataclass
class Counts:
    """What encoding did to a set of examples."""

    records: int = 0
    tokens: int = 0            # kept, after truncation
    scored_tokens: int = 0     # kept labels other than -100 (after the one-position shift)
    truncated: int = 0         # cut to max_length and kept
    dropped: int = 0           # left out: too long under "drop", or nothing left to score
    dropped_empty: int = 0     # of those, with no scored token (cut away, or none at all)
    skipped_bad: int = 0       # malformed records left out (a stream's skip_bad_records)
    # each kept example's tokens; None where a stream counts without keeping them
    lengths: list[int] | None = field(default_factory=list)

    def add(self, other: "Counts") -> None:
        for name in ("records", "tokens", "scored_tokens", "truncated", "dropped",
                     "dropped_empty", "skipped_bad"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if self.lengths is not None and other.lengths is not None:
            self.lengths += other.lengths


def full_ids(example: Example, tok, *, loss_on: str = "assistant") -> tuple[list[int], list[int]]:
    """Token ids and labels of ``example``, before any truncation."""
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if example.text is not None:
        ids = tok.encode(example.text) + eos
        return ids, list(ids)
    if example.messages is not None or getattr(tok, "has_chat_template", False):
        rendered = chat.render(tok, example.conversation(), loss_on=loss_on,
                               scored_from=example.scored_from, where=example.where)
        return chat.encode(tok, rendered)
    p = tok.encode(example.prompt)
    c = tok.encode(example.completion) + eos
    return p + c, ([IGNORE] * len(p) + c) if loss_on != "all" else p + c


def trained_ids(example: Example, tok, *, loss_on: str = "assistant"
                ) -> tuple[list[int], list[int]]:
    """:func:`full_ids` without the unscored tail: the tokens after the last
    scored one (the template's newline after the last ``<|im_end|>``) predict
    nothing that is scored, so training never runs them."""
    ids, labels = full_ids(example, tok, loss_on=loss_on)
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    return (ids[:end], labels[:end]) if end else (ids, labels)


def encode(example: Example, tok, max_length: int, *, loss_on: str = "assistant"
           ) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example as training sees them, cut to
    ``max_length`` (labels -100 where not scored)."""
    ids, labels = trained_ids(example, tok, loss_on=loss_on)
    return ids[:max_length], labels[:max_length]


def _scored(labels: list[int]) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE)  # position 0 has no context


def encode_lm(examples, tok, max_length: int, *, loss_on: str = "assistant",
              truncation: str = "right") -> tuple[list[tuple[list[int], list[int]]], Counts]:
    """Encode language modelling examples under the truncation policy."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}")
    kept, counts = [], Counts()
    for ex in examples:
        item = encode_one(ex, tok, max_length, counts, loss_on=loss_on, truncation=truncation)
        if item is not None:
            kept.append(item)
    return kept, counts


def encode_one(ex: Example, tok, max_length: int, counts: Counts, *, loss_on: str = "assistant",
               truncation: str = "right") -> tuple[list[int], list[int]] | None:
    """One language modelling example under the truncation policy, counted in
    ``counts``; None when it is left out (too long under ``"drop"``, or nothing
    scored within ``max_length``). A stream of examples (:mod:`peftspec.data.stream`)
    encodes one at a time through this, as :func:`encode_lm` does a list."""
    counts.records += 1
    if ex.label is not None:
        raise DataError(f"{ex.where}: a classification record, but the training data is "
                        "language modelling records")
    ids, labels = trained_ids(ex, tok, loss_on=loss_on)
    cut = len(ids) > max_length
    if cut:
        if truncation == "error":
            raise DataError(f"{ex.where}: {len(ids)} tokens, more than max_length "
                            f"{max_length}; raise max_length, or set truncation = "
                            "\"right\" (cut) or \"drop\" (leave such examples out)")
        if truncation == "drop":
            counts.dropped += 1
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    n = _scored(labels)
    if len(ids) < 2 or n == 0:
        counts.dropped += 1
        counts.dropped_empty += 1
        return None
    counts.truncated += cut
    counts.tokens += len(ids)
    counts.scored_tokens += n
    if counts.lengths is not None:
        counts.lengths.append(len(ids))
    return ids, labels
