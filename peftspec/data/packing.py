"""Packing: several examples in one row of ``max_length`` tokens, each seeing only itself.

Most of a padded batch of chat data is padding. With ``packing = true`` the
encoded examples are laid end to end into rows of at most ``max_length``
tokens (whole examples only, first fit in a seeded order), and each example
keeps its own attention:

* ``position_ids`` restart at 0 at every example;
* ``attention_mask`` is 4-D, ``(rows, 1, L, L)``, block-diagonal and causal: a
  token attends to the earlier tokens of its own example only (SDPA takes it
  as it is; transformers' models and the native Llama accept such a mask);
* the label of each example's first token is -100: under the causal shift it
  would be predicted from the previous example's last token.

So a packed batch computes, per example, what the example alone computes:
the loss (a mean over the batch's scored tokens) and its gradients equal
those of the same examples run one by one, weighted by their scored tokens
(``tests/test_packing.py``, to 1e-5 in fp32). Padding fills a row's tail as
one more segment of its own, labelled -100.

The rows are made once per run, from a permutation seeded by the run's seed,
and then batched like examples (a new seeded order each epoch), so packing
stays a pure function of ``(seed, epoch)`` and ``--resume`` sees the same
batches as an uninterrupted run.
"""

from __future__ import annotations

import torch

from peftspec.data.encoding import IGNORE

Item = tuple[list[int], list[int]]


class Batch(dict):
    """The model's inputs (a dict, passed as ``model(**batch)``) and the count of
    real tokens in it (``tokens``: padding excluded), which a 4-D mask does not
    give by summing."""

    tokens: int = 0


def pack(items: list[Item], max_length: int, seed: int) -> list[list[Item]]:
    """Rows of whole examples, each row at most ``max_length`` tokens: the items
    in a seeded order, each put in the first row it fits (first fit)."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[Item]] = []
    room: list[int] = []
    for i in order:
        n = len(items[i][0])
        if n > max_length:
            raise ValueError(f"an example of {n} tokens is longer than max_length {max_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(items[i])
                room[r] -= n
                break
        else:
            rows.append([items[i]])
            room.append(max_length - n)
    return rows


def collate_packed(rows: list[list[Item]], pad_id: int) -> Batch:
    """``input_ids``, ``labels``, ``position_ids`` and the block-diagonal causal
    ``attention_mask`` of packed rows, right-padded to the longest."""
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), -1, dtype=torch.long)
    tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for k, (ids, lab) in enumerate(row):
            m = len(ids)
            input_ids[r, at:at + m] = torch.tensor(ids)
            labels[r, at + 1:at + m] = torch.tensor(lab[1:])  # the first: no context
            positions[r, at:at + m] = torch.arange(m)
            segments[r, at:at + m] = k
            at += m
        tokens += at
        positions[r, at:] = torch.arange(width - at)  # padding: a segment of its own
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal[None] & (segments[:, :, None] == segments[:, None, :])
    batch = Batch(input_ids=input_ids, labels=labels, position_ids=positions,
                  attention_mask=mask[:, None])
    batch.tokens = tokens
    return batch


class PackingError(ValueError):
    """The model does not keep packed examples apart."""


@torch.no_grad()
def verify(model, vocab_size: int | None = None) -> None:
    """Check that ``model`` keeps packed examples apart: two short examples
    packed into one row must give the logits each gives alone. A model that
    ignores ``position_ids`` or a 4-D ``attention_mask`` would let tokens attend
    across examples; this finds it before training, on one tiny forward pass."""
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings",
                                                           None)) else None
    vocab = vocab_size or getattr(emb, "num_embeddings", None) or 2
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (3,), generator=g).tolist()
    b = torch.randint(0, vocab, (4,), generator=g).tolist()
    was_training = model.training
    model.eval()
    try:
        batch = collate_packed([[(a, a), (b, b)]], pad_id=0)
        packed = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
        alone_b = model(input_ids=torch.tensor([b], device=device)).logits
    except (TypeError, RuntimeError, ValueError) as exc:
        raise PackingError(f"packing needs a model that takes position_ids and a 4-D "
                           f"attention_mask; {type(model).__name__} failed on them: "
                           f"{type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    if not torch.allclose(packed[0, 3:].float(), alone_b[0].float(), rtol=1e-3, atol=1e-3):
        raise PackingError(f"packing needs a model that keeps packed examples apart (it must "
                           f"read position_ids and a 4-D attention_mask); "
                           f"{type(model).__name__} lets one example see another. Train "
                           "without packing (packing = false)")
