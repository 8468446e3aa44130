"""Selective training: make chosen original parameters trainable.

``[[train]]`` rules use the ``select`` method unless they name another. It
adds nothing: the compiler resolves ``params`` selectors against parameter
names (``**.bias`` for BitFit, ``type:LayerNorm`` for norms, ``layers.11.**``
for a whole layer) and the apply step leaves exactly those trainable.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftspec.plugin_api import Method, hookimpl, selectors


@dataclass(frozen=True)
class SelectOptions:
    params: tuple[str, ...] = selectors(kind="params",
                                        doc="parameters to train: '**.bias', 'type:LayerNorm'")


class Select(Method):
    name = "select"
    family = "train"
    Options = SelectOptions
    summary = "train chosen original parameters (BitFit biases, norms, whole layers)"
    unchanged_at_apply = True  # it only unfreezes


@hookimpl
def register_methods(register):
    register(Select())
