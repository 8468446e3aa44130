"""Deprecated alias of :mod:`peftspec.core.packed` (moved after 0.1.0; this name goes in the next release).

Plugin authors: import from :mod:`peftspec.plugin_api` instead.
"""

from __future__ import annotations

import warnings

import peftspec.core.packed as _target


def __getattr__(name: str):
    value = getattr(_target, name)  # AttributeError for a name that was never here
    warnings.warn(f"peftspec.frozen.{name} moved to peftspec.core.packed.{name} (or import it from "
                  "peftspec.plugin_api); the old name goes in the next release",
                  DeprecationWarning, stacklevel=2)
    return value
