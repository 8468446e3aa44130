"""Which modules of a model are frozen how: the model-level state of ``[[freeze]]``.

The weights themselves are :class:`peftspec.core.packed.PackedWeight`; this is
the record beside them (method, options, rule, bytes), kept on the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

STATE_ATTR = "_peftspec_frozen"


@dataclass(frozen=True)
class FrozenEntry:
    """One frozen module: the method and options it was frozen with."""

    method: str
    options: str   # repr of the options, to compare rules of two adapters
    rule: str
    original_bytes: int
    stored_bytes: int


def frozen_state(model: nn.Module) -> dict[str, FrozenEntry]:
    """Path -> :class:`FrozenEntry` of every module frozen on ``model`` (live dict)."""
    return model.__dict__.setdefault(STATE_ATTR, {})


def frozen_modules(model: nn.Module) -> dict[str, FrozenEntry]:
    return dict(model.__dict__.get(STATE_ATTR, {}))


def storage_options(options: Any) -> str:
    """A freeze rule's storage options as text (``block_size=64, ...``): what must
    agree for two adapters to share one frozen module. Selectors do not count."""
    import dataclasses

    if not dataclasses.is_dataclass(options):
        return ""
    return ", ".join(f"{f.name}={getattr(options, f.name)!r}"
                     for f in dataclasses.fields(options) if "selector" not in f.metadata)
