"""Values derived from a layer's tensors, computed once and kept while those
tensors keep their values: DoRA's weight norm, LoRA's ``Bᵀ`` laid out for the
one-token product. Only outside training: the caller decides when to ask.

A kept value is reused while the very same tensors (weak references) hold the
same values: their version counters, which every in-place write bumps
(optimizer steps, ``copy_`` from a file), and their memory (``t.data = ...``);
a packed weight's are those of its stored tensors. A write through
``t.data.copy_`` bypasses the counter: :func:`forget` the layer after one.
Values live in the layer's ``__dict__`` in a holder that copies and pickles
as empty, so copies, pickles and state dicts never carry them (and the
lookup, once per projection per token, is a plain attribute read)."""

from __future__ import annotations

import weakref
from typing import Callable

import torch

SLOT = "_kept"


class _Kept(dict):
    """name -> (tensor refs, their versions, context, value); empty when copied."""

    def __reduce__(self):
        return (_Kept, ())

    def __copy__(self):
        return _Kept()

    def __deepcopy__(self, memo):
        return _Kept()


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _versions(t: torch.Tensor) -> tuple:
    if type(t) in _PLAIN:  # the common case, without getattr's miss (an exception)
        return (t.data_ptr(), t._version)
    stored = getattr(t, "stored", None)
    if isinstance(stored, dict):
        return tuple((v.data_ptr(), v._version) for v in stored.values())
    return (t.data_ptr(), t._version)


def kept(layer, name: str, tensors: tuple, context, compute: Callable[[], torch.Tensor]):
    """``compute()``, or the value kept for ``layer`` under ``name`` when ``tensors``
    and ``context`` (anything else it depends on, compared with ``==``) are
    unchanged since. Tensors that keep no version counter (made under
    ``torch.inference_mode``) are never kept."""
    try:  # (once per projection per token: no generators for the usual one tensor)
        versions = ((_versions(tensors[0]),) if len(tensors) == 1
                    else tuple(_versions(t) for t in tensors))
    except RuntimeError:  # an inference tensor: no version counter to trust
        return compute()
    slots = layer.__dict__.get(SLOT)
    hit = slots.get(name) if slots is not None else None
    if hit is not None and hit[1] == versions and hit[2] == context and (
            hit[0][0]() is tensors[0] if len(tensors) == 1 else
            all(ref() is t for ref, t in zip(hit[0], tensors))):
        return hit[3]
    value = compute()
    if slots is None:
        slots = layer.__dict__[SLOT] = _Kept()
    slots[name] = (tuple(weakref.ref(t) for t in tensors), versions, context, value)
    return value


def forget(layer) -> None:
    """Drop every value kept for ``layer`` (each is computed again when next asked)."""
    layer.__dict__.pop(SLOT, None)


def autocast_context(t: torch.Tensor) -> tuple:
    """Autocast's state for ``t``'s device: it changes the dtype products come out in."""
    kind = t.device.type
    on = torch.is_autocast_enabled(kind)
    return (kind, on, torch.get_autocast_dtype(kind) if on else None)
