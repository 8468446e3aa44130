"""The values of the frozen base during apply (issue 27, point 2): whether a
plugin wrote one in place, and which, in time O(1) per tensor.

:class:`ValueGuard` takes every plain base tensor's version counter before the
first step and compares after the last; for a method that is not peftspec's
own it holds :class:`~peftspec.core.barrier.WriteBarrier` around ``apply`` and
samples the bytes of a tensor whose memory leaves torch. Costs are measured by
``bench/bench_value_guard.py``.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from peftspec.core.barrier import BaseWriteRefused, WriteBarrier
from peftspec.core.errors import PluginError
from peftspec.core.promise import BaseSnapshot, owner_step, plugin_who

_PLAIN = (torch.Tensor, nn.Parameter)


def _spots(t: torch.Tensor) -> tuple[int, ...]:
    """Where :func:`_read` samples ``t``: the addresses of its first 16 bytes and of
    16 in its middle (all of it when smaller); ``()`` where it cannot read memory
    directly (not a contiguous CPU tensor)."""
    if not t.is_cpu or not t.is_contiguous():
        return ()
    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    if nbytes <= 32:
        return (ptr, nbytes)
    return (ptr, 16, ptr + (nbytes // 2 & ~15), 16)


def _read(spots: tuple[int, ...], t: torch.Tensor) -> bytes | torch.Tensor:
    """The sampled bytes (what a write through ``.data``, which bypasses the
    version counter, changes), read straight from memory: a microsecond, where
    a torch operation costs several. Elsewhere (CUDA) a few elements' bits."""
    if spots:
        if len(spots) == 2:
            return ctypes.string_at(*spots)
        return ctypes.string_at(spots[0], 16) + ctypes.string_at(spots[2], 16)
    flat = t.detach().reshape(-1)
    picked = flat[::max(1, flat.numel() // 4)]
    d = _BITS.get(picked.element_size())
    return (picked.view(d) if d is not None and picked.dtype != d else picked).clone()


def _same(a, b) -> bool:
    return a == b if isinstance(a, bytes) else torch.equal(a, b)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ValueGuard:
    """Whether a value of a frozen base tensor was written in place during apply
    (``weight.add_(...)``), in time O(1) per tensor: :class:`PluginError` names
    the plugin, and ``apply_plan`` rolls the model back.

    It covers every plain base tensor of the model (``snap``), taken once before
    the first step and compared once after the last (and after ``after_apply``
    hooks), and when a step raises. Each tensor's version counter is compared:
    every in-place torch operation bumps it (on the tensor, a view or
    ``detach()`` of it, under ``no_grad`` too). A method that is not peftspec's
    own runs its ``apply`` inside :meth:`barrier`, which refuses torch's in-place
    writes into the base before they happen (``.data``'s included, which
    bypass the counter), so nothing needs putting back; and where such a plugin
    takes a base tensor's memory out of torch (``.numpy()``, ``data_ptr()``,
    ``untyped_storage()``...), the barrier has a few of its bytes sampled at that
    moment (:meth:`escape`), compared after. ``sample``: every tensor's bytes
    sampled up front instead, for code that runs outside any barrier
    (``after_apply`` hooks). A write through escaped memory is reported but cannot
    be put back: no copy of the base is kept (copying it would cost several times
    apply itself: ``bench/bench_value_guard.py``). The tensors of a rule that
    announced a rewritten base (``exempt``: PiSSA's residual) are left out, and
    so are packed (``[[freeze]]``) and meta tensors: the former refuse writes.
    """

    __slots__ = ("names", "tensors", "versions", "sampled", "_index", "_barrier")

    def __init__(self, snap: BaseSnapshot, exempt: tuple[str, ...] = (), sample: bool = False):
        # written for speed: thousands of tensors (bench/bench_value_guard.py)
        keep = [i for i, t in enumerate(snap.tensors) if type(t) in _PLAIN and not t.is_meta]
        if exempt:
            keep = [i for i in keep if not _under(snap.names[i], exempt)]
        self.names = [snap.names[i] for i in keep]
        self.tensors = [snap.tensors[i] for i in keep]
        self.versions = [t._version for t in self.tensors]
        # index -> (spots, bytes): sampled at its escape, or all of them now
        self.sampled: dict[int, tuple] = {i: (sp, _read(sp, t)) for i, t in enumerate(
            self.tensors) for sp in (_spots(t),)} if sample else {}
        self._index: dict[str, int] | None = None
        self._barrier: WriteBarrier | None = None

    def escape(self, name: str) -> None:
        """Sample tensor ``name`` now: its memory is being handed out of torch, where
        a write would bypass its version counter (called by the barrier)."""
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.names)}
        i = self._index.get(name)
        if i is not None and i not in self.sampled:
            sp = _spots(self.tensors[i])
            self.sampled[i] = (sp, _read(sp, self.tensors[i]))

    def changed(self) -> list[int]:
        """Which tensors were written (one whose memory moved is :meth:`BaseSnapshot.moved`'s)."""
        now = [t._version for t in self.tensors]
        out = [] if now == self.versions else [  # the common case, compared in C
            i for i, (a, b) in enumerate(zip(now, self.versions)) if a != b]
        for i, (sp, s) in self.sampled.items():
            t = self.tensors[i]
            if i not in out and (not sp or sp[0] == t.data_ptr()) and not _same(_read(sp, t), s):
                out.append(i)
        return sorted(out)

    def barrier(self) -> WriteBarrier:
        """A :class:`~peftspec.core.barrier.WriteBarrier` over these tensors, to
        hold around a plugin's ``Method.apply`` (one for the whole apply: its
        ``refused`` is cleared here)."""
        if self._barrier is None:
            self._barrier = WriteBarrier(self.names, self.tensors, on_escape=self.escape)
        self._barrier.refused = None
        return self._barrier

    def raise_refused(self, registry, step, barrier: WriteBarrier | None,
                      cause: BaseException | None = None) -> None:
        """Raise :meth:`refused`'s error where ``barrier`` (``None``: none was held)
        refused a write, ``cause`` chained."""
        if barrier is not None and barrier.refused is not None:
            raise self.refused(registry, step, barrier.refused) from cause

    @staticmethod
    def refused(registry, step, refusal: BaseWriteRefused) -> PluginError:
        """The error for a write the barrier refused (nothing was written)."""
        return PluginError(
            f"{plugin_who(registry, step)} ({step.rule}, spec line {step.line}) tried to write "
            f"frozen base tensor '{refusal.name}' in place during apply ({refusal.op}); "
            "peftspec refused the write before it happened, so the base keeps its values "
            "and the model was rolled back unchanged. Base tensors must keep their values: "
            "put a change in the adapter's own parameters, or announce a rewritten base "
            "with Method.base_note")

    def check(self, registry, plan, failed=None) -> None:
        """Raise :class:`PluginError` if a value changed, naming the step that owns
        the first changed tensor (``failed``: the step whose apply raised; ``plan``
        ``None``: after the steps were checked, so an ``after_apply`` hook)."""
        changed = self.changed()
        if not changed:
            return
        names = [self.names[i] for i in changed]
        step = owner_step(plan, names[0].rpartition(".")[0]) if plan is not None else None
        rule = step.rule if step else None  # the tensors of that rule's targets, listed
        mine = [n for n in names if plan is None or getattr(
            owner_step(plan, n.rpartition(".")[0]), "rule", None) == rule]
        listed = ", ".join(f"'{n}'" for n in mine[:3])
        more = len(names) - len(mine[:3])
        more = f" (and {more} more)" if more else ""
        who = (f"{plugin_who(registry, step)} ({step.rule}, spec line {step.line})" if step else
               "an after_apply hook" if plan is None else "code outside the planned modules")
        raise PluginError(
            f"{who} wrote frozen base tensor {listed}{more} in place during apply"
            + (" before raising" if failed is not None and failed.rule == rule else "")
            + "; base tensors must keep their values (put a change in the adapter's own "
            "parameters, or announce a rewritten base with Method.base_note). The modules "
            "were rolled back, but the values it wrote cannot be put back (peftspec keeps no "
            "copy of the base): reload the model before using it")


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or name.startswith(p + ".") for p in prefixes)


__all__ = ["ValueGuard"]
