"""The learning-rate schedule: linear warmup, then a cosine decay.

A pure function of the optimizer step, so a checkpoint needs to store only the
step (and the schedule's settings, to check a resumed run uses the same).
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``.

    Steps ``0 .. warmup-1`` rise linearly to ``lr`` (step 0 gets ``lr/warmup``);
    the rest follow half a cosine from ``lr`` down to ``lr * min_lr_ratio``,
    reached after the last step.
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    decay = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / decay, 1.0)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
