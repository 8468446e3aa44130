"""Refusing a write to a frozen base tensor before it happens (issue 27, point 2).

While a step's ``Method.apply`` runs, :class:`WriteBarrier` (a
``TorchFunctionMode``) looks at every torch call the plugin makes. An in-place
one (``add_``, ``copy_``, ``t[i] = v``, ``x += y``, ``out=``, ``torch.nn.init``'s
fills) whose destination shares memory with one of the step's base tensors
(the tensor itself, a view, ``.data``, ``.detach()``) raises
:class:`BaseWriteRefused` instead of writing: the base keeps its values, so
rolling back the modules leaves the model exactly as it was. The refusal is
also recorded, so a plugin that swallows the exception is still reported.

Reads, new tensors and metadata (``requires_grad_``) pass through. A write
through numpy or raw memory is not a torch call, but taking the memory out of
torch is (``.numpy()``, ``__array__``, ``data_ptr()``, ``untyped_storage()``,
``__dlpack__``): for a base tensor the barrier calls ``on_escape(name)`` first,
and ``core.valueguard.ValueGuard`` samples a few of its bytes then, compared after
apply.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# in-place by name but leaving values alone: autograd flags and bookkeeping
_METADATA = frozenset({"requires_grad_", "retain_grad", "share_memory_", "detach_"})
_DUNDER = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                     "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__",
                     "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"})

_DEST_KEYS = ("tensor", "input", "self", "out")
# hand a tensor's memory out of torch, where writes bypass its version counter
_ESCAPES = frozenset({"numpy", "__array__", "data_ptr", "untyped_storage", "storage",
                      "_typed_storage", "__dlpack__", "__cuda_array_interface__"})


class BaseWriteRefused(RuntimeError):
    """A plugin's ``apply`` tried to write a frozen base tensor; nothing was written."""

    def __init__(self, name: str, op: str):
        self.name, self.op = name, op
        super().__init__(f"peftspec refused '{op}' on frozen base tensor '{name}' during "
                         "Method.apply: base tensors must keep their values")


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # subclasses without storage
        return None


_KIND: dict = {}  # torch function -> 1 writes its first argument, 2 escapes it, 0 neither


def _kind(func) -> int:
    name = getattr(func, "__name__", "")
    k = (1 if name in _DUNDER or (name.endswith("_") and not name.startswith("_")
                                  and name not in _METADATA)
         else 2 if name in _ESCAPES else 0)
    try:
        _KIND[func] = k
    except TypeError:  # not hashable: asked again next time
        pass
    return k


class WriteBarrier(TorchFunctionMode):
    """Refuse torch's in-place writes into ``tensors`` (named by ``names``) while
    active."""

    def __init__(self, names, tensors: list[torch.Tensor], on_escape=None):
        super().__init__()
        self._names, self._tensors, self._on_escape = names, tensors, on_escape
        self._storages: dict[int, str] | None = None  # made at the first write
        self.refused: BaseWriteRefused | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # every torch call apply makes comes through here: a dictionary lookup
        k = _KIND.get(func)
        if k is None:
            k = _kind(func)
        if k == 1 or (kwargs and kwargs.get("out") is not None):
            self._check(func, args, kwargs)
        elif k == 2 and self._on_escape is not None and args and \
                isinstance(args[0], torch.Tensor):
            ptr = _storage(args[0])
            name = self.storages.get(ptr) if ptr else None
            if name is not None:
                self._on_escape(name)  # sampled before the memory leaves torch
        return func(*args, **kwargs) if kwargs else func(*args)

    @property
    def storages(self) -> dict[int, str]:
        """Data pointer of each guarded tensor's storage -> its name."""
        if self._storages is None:
            self._storages = storages_of(list(self._names), self._tensors)
        return self._storages

    def _check(self, func, args, kwargs) -> None:
        # the destination: the first argument, however it was passed
        # (``torch.nn.init``'s functions forward theirs as ``tensor=``), and ``out``
        kwargs = kwargs or {}
        dests = []
        for d in (args[0] if args else None, *map(kwargs.get, _DEST_KEYS)):
            if d is not None:
                dests.extend(d if isinstance(d, (list, tuple)) else (d,))
        for t in dests:
            if isinstance(t, torch.Tensor):
                ptr = _storage(t)
                name = self.storages.get(ptr) if ptr else None
                if name is not None:
                    op = getattr(func, "__name__", repr(func))
                    self.refused = self.refused or BaseWriteRefused(name, op)
                    raise BaseWriteRefused(name, op)


def storages_of(names: list[str], tensors: list[torch.Tensor]) -> dict[int, str]:
    """Data pointer of each tensor's storage -> its name (the first, where shared)."""
    out: dict[int, str] = {}
    for name, t in zip(names, tensors):
        ptr = _storage(t)
        if ptr:  # 0: an empty storage, which no write can change
            out.setdefault(ptr, name)
    return out


def built_in(info) -> bool:
    """Whether a registered method (its ``MethodInfo``) is one of peftspec's own:
    from the ``peftspec`` distribution, its class from ``peftspec_plugins``. Their
    ``apply`` runs without the barrier (its per-call dispatch would cost more than
    apply itself); the conformance kit checks them, and ``ValueGuard``'s version
    counters still see any torch write."""
    return (info is not None and info.dist == "peftspec"
            and type(info.method).__module__.startswith("peftspec_plugins."))


__all__ = ["BaseWriteRefused", "WriteBarrier", "built_in", "storages_of"]
