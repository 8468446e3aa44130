"""The training hooks of the active adapter's methods (:class:`~peftspec.core.capabilities.Trains`).

:func:`training_hooks` asks each method of the active adapter, once, with all
of its steps, for a :class:`peftspec.core.method.TrainingHooks`; the loop then adds
their ``extra_loss()`` to each micro-batch's loss and calls ``after_step``
after each optimizer step. A hand-written loop does the same::

    hooks = peftspec.training_hooks(model, total_steps)
    for step in range(1, total_steps + 1):
        loss = model(**batch).loss
        loss = loss + sum(h.extra_loss() or 0 for h in hooks)
        loss.backward()
        optimizer.step()
        for h in hooks:
            h.after_step(step)
        optimizer.zero_grad()
"""

from __future__ import annotations

import torch
from torch import nn

from peftspec.core.capabilities import InitFromData, Trains
from peftspec.core.blame import context, reraise
from peftspec.core.errors import PluginInputError
from peftspec.core.method import TrainingHooks
from peftspec.core.patching import state_of


def training_hooks(model: nn.Module, total_steps: int) -> list[TrainingHooks]:
    """The hook objects of the active adapter's methods, in plan order."""
    by_method: dict[str, tuple] = {}
    for rec in state_of(model).records:
        by_method.setdefault(rec.step.method, (rec.method, []))[1].append(rec.step)
    out = []
    for name, (method, steps) in by_method.items():
        if not isinstance(method, Trains):
            continue
        try:
            hooks = method.training(model, steps, total_steps)
        except ValueError as exc:
            raise PluginInputError(f"cannot train method '{name}' "
                                   f"({_where(model, steps)}): {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the plugin failing: named (core.blame)
            _reraise(model, exc, steps, "training")
        if hooks is not None:
            out.append(hooks)
    return out


def extra_loss(hooks: list[TrainingHooks]) -> torch.Tensor | None:
    """The sum of the hooks' extra loss terms (``None`` when none has one)."""
    terms = [t for t in (h.extra_loss() for h in hooks) if t is not None]
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def init_from_data(model: nn.Module, batches, report=None) -> None:
    """Let each method of the active adapter initialise itself from ``batches``
    (:class:`~peftspec.core.capabilities.InitFromData`; LoRA's ``init = "eva"``), in plan order.

    ``batches`` is iterated only by methods that need data, maybe more than
    once (a list, or a :class:`Reiterable`)."""
    by_method: dict[str, tuple] = {}
    for rec in state_of(model).records:
        by_method.setdefault(rec.step.method, (rec.method, []))[1].append(rec.step)
    for name, (method, steps) in by_method.items():
        if not isinstance(method, InitFromData):
            continue
        try:
            method.init_from_data(model, steps, batches, report)
        except ValueError as exc:
            raise PluginInputError(f"cannot initialise method '{name}' "
                                   f"({_where(model, steps)}) from the data: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            _reraise(model, exc, steps, "init_from_data")


def _where(model, steps) -> str:
    """Who provides the steps' method, and their rules with the spec's file and lines."""
    adapter = state_of(model).current
    return context(adapter.registry, steps, adapter.plan.spec.file)


def _reraise(model, exc, steps, hook):
    adapter = state_of(model).current
    reraise(exc, adapter.registry, steps, hook, adapter.plan.spec.file)


class Reiterable:
    """An iterable that calls ``make()`` for each iteration: batches built lazily,
    only when a method reads them."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())
