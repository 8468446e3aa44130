"""Applying a plan's ``[[freeze]]`` steps: packing base weights before adapters.

Freezing changes how the *base* is stored, so it belongs to the model, not to
one adapter: the packed weights stay when an adapter is removed or switched
(no float copy is kept to go back to), and a second adapter whose rules ask
for the same storage of a module finds it done. :func:`freeze_steps` runs
first in :func:`peftspec.apply_plan`; if anything after it fails, the caller
calls :meth:`Freeze.undo` and the original float parameters (held only until
then) are put back, so a failed apply or load leaves the model as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peftspec.core.blame import reraise
from peftspec.core.packed import FrozenEntry, frozen_state, is_packed, storage_options, stored_bytes


@dataclass
class Freeze:
    """What :func:`freeze_steps` did: (module, path, original parameter) per weight."""

    done: list[tuple[nn.Module, str, nn.Parameter]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.done)

    def replaced(self) -> dict[int, nn.Parameter]:
        """id(original parameter) -> its packed replacement."""
        return {id(old): m._parameters["weight"] for m, _, old in self.done}

    def undo(self, model: nn.Module) -> None:
        """Put the float originals back (and into the adapters' bookkeeping)."""
        patch = model.__dict__.get("_peftspec")
        if patch is not None and self.done:
            back = {id(m._parameters["weight"]): old for m, _, old in self.done}
            patch.requires_grad = [(back.get(id(p), p), f) for p, f in patch.requires_grad]
        state = frozen_state(model)
        for module, path, old in reversed(self.done):
            module._parameters["weight"] = old
            state.pop(path, None)
        if not state:
            model.__dict__.pop("_peftspec_frozen", None)
        self.done.clear()

    def commit(self) -> None:
        """Drop the references to the float originals (their memory goes)."""
        self.done.clear()


def freeze_steps(model: nn.Module, plan, registry) -> Freeze:
    """Pack the weight of every ``[[freeze]]`` target of ``plan`` not packed yet."""
    result = Freeze()
    steps = [s for s in plan.steps if s.family == "freeze"]
    if not steps:
        return result
    state = frozen_state(model)
    try:
        for step in steps:
            module = model.get_submodule(step.target) if step.target else model
            old = module._parameters["weight"]
            if is_packed(old):  # the same storage, checked at compile time
                continue
            method = registry.method(step.method)
            try:
                with torch.no_grad():
                    packed = method.pack(old.detach(), step)
            except Exception as exc:  # noqa: BLE001 - named (core.blame)
                reraise(exc, registry, step, "pack", plan.spec.file, target=step.target)
            module._parameters["weight"] = nn.Parameter(packed, requires_grad=False)
            result.done.append((module, step.target, old))
            state[step.target] = FrozenEntry(
                method=step.method, options=storage_options(step.options), rule=step.rule,
                original_bytes=old.numel() * old.element_size(),
                stored_bytes=stored_bytes(packed))
    except BaseException:
        result.undo(model)
        raise
    return result
