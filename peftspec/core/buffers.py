"""Buffers an adapter adds: adapter state, as its parameters are.

A buffer registered (``register_buffer``) on a module a method's ``apply``
builds, or on a child of it, belongs to the adapter. A persistent one (the
default) is saved in the adapter file under its full name and copied back on
load, once ``apply`` has re-created it; a non-persistent one
(``persistent=False``) is not saved: ``apply`` recomputes it on load, so it must
come out the same (derived from the options and the base, or seeded). A buffer
registered on a module ``apply`` was given (a base module) is refused at apply
(:func:`new_base_buffers`): it would stay on the base when the adapter is off.
"""

from __future__ import annotations

import torch
from torch import nn


def adapter_buffers(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """``{full name: (buffer, persistent)}`` for every buffer of the patched ``model``
    (its active adapter installed) that is not one of the base's."""
    state = getattr(model, "_peftspec", None)
    if state is None or state.active is None:
        return {}
    base = set(state.base_buffer_names)
    found = []
    for path, module in model.named_modules():
        if module._buffers:
            prefix = f"{path}." if path else ""
            found += [(prefix + k, t, k not in module._non_persistent_buffers_set)
                      for k, t in module._buffers.items() if t is not None]
    # a base buffer the adapter also holds under another name stays the base's
    seen = {id(t) for name, t, _ in found if name in base}
    out: dict[str, tuple[torch.Tensor, bool]] = {}
    for name, t, persistent in found:
        if name not in base and id(t) not in seen:
            seen.add(id(t))
            out[name] = (t, persistent)
    return out


def buffer_keys(module: nn.Module) -> tuple[str, ...]:
    """The keys of ``module``'s own buffers, compared around one ``apply``."""
    return tuple(module._buffers) if module._buffers else ()


def new_base_buffers(module: nn.Module, before: tuple[str, ...]) -> list[str]:
    """Buffers ``apply`` registered on the (base) module it was given, removed again
    (the rollback leaves the module as it was); their keys, for the error."""
    added = [k for k in module._buffers if k not in before]
    for k in added:
        del module._buffers[k]
        module._non_persistent_buffers_set.discard(k)
    return added
