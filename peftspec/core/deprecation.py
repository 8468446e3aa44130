"""Old import paths kept for one release after a move, each access warning."""

from __future__ import annotations

import importlib
import warnings


def moved_module(old: str, new: str):
    """A module-level ``__getattr__`` for the alias module ``old``: every name is
    looked up in ``new`` and warns (``DeprecationWarning``) naming the new path."""
    def __getattr__(name: str):
        value = getattr(importlib.import_module(new), name)  # AttributeError: never here
        warnings.warn(f"{old}.{name} moved to {new}.{name} (or import it from "
                      "peftspec.plugin_api); the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
