"""A synthetic family of byte-level tasks, and a small default model pretrained on it.

Each sequence is::

    <filler>  <markers>  ':'  x1 y1  x2 y2  ...  xn yn

* ``x`` are symbols of a 16-letter alphabet (bytes ``a``..``p``), drawn at random;
* ``y = f(x)``, where ``f`` is named by the markers, applied left to right:
  ``I`` copy, ``S`` shift by one (mod 16), ``R`` reflect (15 - x), ``W`` swap
  neighbours (x xor 1); so ``RW`` means reflect, then swap;
* the filler is 0..``max_fill`` random digit bytes, so the model learns to find
  the markers by content, wherever they sit (a soft prompt or a prefix moves
  the real tokens right);
* labels are ``-100`` everywhere but on the ``y`` symbols (the model shifts
  labels inside), so the loss is the answer's cross-entropy only.

The pretraining family is every single operation and every ordered pair of
``S``, ``R``, ``W``. A NEW task keeps the format but replaces the markers with
a byte never seen in pretraining (``?``) that means one of the compositions
(``NEW_TASK``: reflect, then swap): the model has to be told, by an adapter,
what the new marker means. The pretrained model cannot do it (it answers with
some other operation, confidently), but everything the answer needs is in it,
so a soft prompt can solve it by steering.
"""

from __future__ import annotations

import itertools
import math

import torch

from peftspec.models.nanogpt import GPT, GPTConfig

ALPHABET = 16
FIRST = ord("a")
FILLER = tuple(range(ord("0"), ord("9") + 1))
SEP = ord(":")
NEW_MARKER = ord("?")
OPS = {
    "I": lambda x: x,
    "S": lambda x: (x + 1) % ALPHABET,
    "R": lambda x: ALPHABET - 1 - x,
    "W": lambda x: x ^ 1,
}
FAMILY = tuple(["I", "S", "R", "W"] + ["".join(p) for p in itertools.product("SRW", repeat=2)])
NEW_TASK = "RW"  # what the unseen marker means in the adaptation task
CHANCE_LOSS = math.log(ALPHABET)  # guessing the answer uniformly among the 16 symbols

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, seed=0)


def apply_ops(markers: str, x: int) -> int:
    for m in markers:
        x = OPS[m](x)
    return x


def make_batch(gen: torch.Generator, n: int, tasks, *, marker: int | None = None,
               pairs: int = 12, max_fill: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences, each of a task drawn from ``tasks`` (marker strings).

    ``marker``: a token to show instead of the task's own markers (the task's
    function still decides the answers). Returns (input_ids, labels), right
    padded with filler bytes whose labels are -100.
    """
    rows = []
    for _ in range(n):
        task = tasks[int(torch.randint(len(tasks), (1,), generator=gen))]
        n_fill = int(torch.randint(max_fill + 1, (1,), generator=gen))
        fill = [FILLER[i] for i in torch.randint(len(FILLER), (n_fill,), generator=gen).tolist()]
        shown = [ord(m) for m in task] if marker is None else [marker]
        ids = fill + shown + [SEP]
        labels = [-100] * len(ids)
        for x in torch.randint(ALPHABET, (pairs,), generator=gen).tolist():
            y = FIRST + apply_ops(task, x)
            ids += [FIRST + x, y]
            labels += [-100, y]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((n, width), FILLER[0], dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
    return input_ids, labels


def pretrain(steps: int = 600, batch: int = 32, lr: float = 3e-3, seed: int = 0) -> GPT:
    """The default model, shrunk, trained on the family (10-15 s on two idle cores)."""
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    model.train()
    for _ in range(steps):
        ids, labels = make_batch(gen, batch, FAMILY)
        loss = model(ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


@torch.no_grad()
def answer_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    return float(model(ids, labels=labels).loss)
