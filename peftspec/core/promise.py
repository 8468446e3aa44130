"""The framework checking its own promise after every apply.

peftspec promises that the frozen base stays bit-identical: after
:func:`peftspec.apply_plan` every base parameter and buffer is the same tensor
object, still in the model, over the same memory, and the parameters a plan
announced (``Method.count_params``) are the ones the adapter modules expose
through ``adapter_params()``. A plugin that clones a base weight, assigns a
weight's ``.data``, forgets ``adapter_params()`` or miscounts breaks that
promise silently; :func:`verify` catches it and raises a
:class:`~peftspec.core.errors.PluginError` naming the plugin's distribution and
method, and ``apply_plan`` rolls the model back. A plugin that writes a base
tensor's values in place is caught by
:class:`~peftspec.core.valueguard.ValueGuard`, over the whole apply.

The check must stay cheap on models of thousands of modules (``bench_core``'s
3,584-module apply): one pass over data pointers before, a few dictionary
lookups per step, and a walk of the whole model and the slow name lookups only
when something is wrong.
"""

from __future__ import annotations

from operator import attrgetter, methodcaller
from typing import Iterable

import torch
from torch import nn

from peftspec.core.fastmodule import all_modules
from peftspec.core.errors import PluginError
from peftspec.core.blame import who as method_who


def _ptr(t: torch.Tensor) -> int | None:
    try:
        return t.data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None


_data_ptr = methodcaller("data_ptr")  # t.data_ptr() per tensor, the loop in C
_data = attrgetter("data")
_numel = methodcaller("numel")


def _ptrs(tensors: list[torch.Tensor]) -> list[int | None]:
    """Each tensor's data pointer (``None`` for a tensor subclass without storage)."""
    try:  # the common case in one pass in C
        return list(map(_data_ptr, tensors))
    except (RuntimeError, NotImplementedError):
        return [_ptr(t) for t in tensors]


class BaseSnapshot:
    """Identity and data pointer of every base tensor, taken just before apply.

    It also holds an alias (``t.data``: no copy) of each tensor's memory, so that
    a plugin that reassigned a base tensor's ``.data`` can be undone
    (:meth:`restore`): the rollback leaves the model as it was, memory included.
    ``names``, ``tensors`` and ``ptrs`` run in parallel: the ``n_params``
    parameters first, then the buffers.
    """

    __slots__ = ("names", "tensors", "ptrs", "n_params", "_alias")

    def __init__(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]):
        self.names = [*params, *buffers]
        self.tensors = [*params.values(), *buffers.values()]
        self.n_params = len(params)
        self.ptrs = _ptrs(self.tensors)
        self._alias = list(map(_data, self.tensors))

    def kind(self, i: int) -> str:
        return "parameter" if i < self.n_params else "buffer"

    def moved(self) -> list[int]:
        """Indices of the tensors whose memory is not the one snapshotted."""
        now = _ptrs(self.tensors)
        if now == self.ptrs:  # the common case, compared in C
            return []
        return [i for i, (a, b) in enumerate(zip(now, self.ptrs)) if b is not None and a != b]

    def restore(self) -> None:
        """Point every base tensor whose memory was swapped back at its own."""
        for i in self.moved():
            self.tensors[i].data = self._alias[i]


def verify(model: nn.Module, snap: BaseSnapshot, adapter_tensors: Iterable[torch.Tensor],
           plan, records, registry, *, kept: bool | None = None) -> None:
    """Raise :class:`PluginError` if the applied adapter broke the promise.

    Args:
        adapter_tensors: the parameters the adapter modules' ``adapter_params()``
            returned (repeats allowed), as ``apply_plan`` just unfroze them.
        plan: the plan just applied; ``records``: its ``Record`` list.
        kept: whether every record passed :func:`kept_by_name`, as the caller
            found while installing them (``None``: look now).

    The fast path, taken when every step swapped its module for one that holds
    the original's own tensors and children under the same names (LoRA, IA3,
    bottleneck's wrapper), costs a few dictionary lookups per step; otherwise
    (a step patched in place, or renamed or dropped a tensor) every module's
    tensors are looked up.
    """
    if not (_kept_by_name(records) if kept is None else kept):
        present_p, present_b = _present(all_modules(model))
        missing = [(name, f"base {snap.kind(i)} '{name}' is no longer in the model (was it "
                          "replaced by a copy? keep the base module's own tensor object, e.g. "
                          "self.weight = base.weight)")
                   for i, (name, t) in enumerate(zip(snap.names, snap.tensors))
                   if id(t) not in (present_p if i < snap.n_params else present_b)]
        if missing:
            _raise_for_names(model, plan, registry, missing)
    moved = snap.moved()
    if moved:
        moved = [(snap.names[i], f"base {snap.kind(i)} '{snap.names[i]}' now points at other "
                                 "memory (its .data was replaced); base tensors must stay "
                                 "untouched")
                 for i in moved]
        _raise_for_names(model, plan, registry, moved)

    unique = {id(p): p for p in adapter_tensors}  # (repeats allowed)
    added = sum(map(_numel, unique.values()))
    if added != plan.params_added:
        present_p, _ = _present(all_modules(model))
        stray = present_p.difference(map(id, snap.tensors[:snap.n_params]), unique)
        if stray:  # the likely cause: new parameters adapter_params() does not report
            _raise_stray(model, plan, registry, stray)
        _raise_count(plan, records, registry, added)


def _kept_by_name(records) -> bool:
    """Whether every step installed a new module holding the original's own
    parameters, buffers and children under the same names."""
    for rec in records:
        if not kept_by_name(rec.original, rec.installed):
            return False
    return True


def kept_by_name(o: nn.Module, i: nn.Module) -> bool:
    """Whether ``i`` is a new module holding ``o``'s own parameters, buffers and
    children under the same names (written for speed: thousands of steps)."""
    if i is o:
        return False
    own, theirs = o._parameters, i._parameters
    if own is not theirs:  # (bottleneck's wrapper adopts the dicts themselves)
        for k, v in own.items():
            if v is not None and theirs.get(k) is not v:
                return False
    own, theirs = o._buffers, i._buffers
    if own and own is not theirs:
        for k, v in own.items():
            if v is not None and theirs.get(k) is not v:
                return False
    own, theirs = o._modules, i._modules
    if own and own is not theirs:
        for k, v in own.items():
            if v is not None and theirs.get(k) is not v:
                return False
    return True


def _present(modules) -> tuple[set[int], set[int]]:
    """ids of every parameter and buffer held by ``modules``."""
    present_p: set[int] = set()
    present_b: set[int] = set()
    for m in modules:
        for p in m._parameters.values():
            if p is not None:
                present_p.add(id(p))
        if m._buffers:
            for b in m._buffers.values():
                if b is not None:
                    present_b.add(id(b))
    return present_p, present_b


def plugin_who(registry, step, where: bool = False) -> str:
    """:func:`peftspec.core.blame.who` for ``step``'s method, with its rule and line."""
    return method_who(registry, step.method) + (
        f" ({step.rule}, spec line {step.line})" if where else "")


def owner_step(plan, name: str):
    """The step whose target is the longest prefix of the dotted ``name`` (of several
    methods on that module, the last: it changed the module last)."""
    best = None
    for step in plan.steps:
        if step.family == "train":
            continue
        t = step.target
        if t == "" or name == t or name.startswith(t + "."):
            if best is None or len(t) >= len(best.target):
                best = step
    return best


def _raise_for_names(model, plan, registry, items) -> None:
    lines = []
    for name, why in items[:5]:
        step = owner_step(plan, name.rpartition(".")[0])
        who = (plugin_who(registry, step, True) + f" on '{step.target or '<model>'}'" if step
               else "an after_apply hook or code outside the planned modules")
        lines.append(f"{who}: {why}")
    more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
    raise PluginError("apply broke the frozen-base promise, the model was left as it was: "
                      + "; ".join(lines) + more)


def _raise_stray(model, plan, registry, stray: set[int]) -> None:
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in stray]
    names = list(dict.fromkeys(names))
    by_step: dict[str, list[str]] = {}
    for n in names:
        step = owner_step(plan, n.rpartition(".")[0])
        key = (plugin_who(registry, step, True) if step else "an after_apply hook")
        by_step.setdefault(key, []).append(n)
    parts = [f"{who}: apply added parameters that no adapter_params() reports "
             f"({', '.join(ns[:3])}{', ...' if len(ns) > 3 else ''}); return every new "
             "parameter from adapter_params(), or it stays frozen and is never saved"
             for who, ns in by_step.items()]
    raise PluginError("; ".join(parts) + " (the model was left as it was)")


def _raise_count(plan, records, registry, added: int) -> None:
    """Name the method(s) whose ``count_params`` disagrees with what apply added."""
    announced: dict[str, int] = {}
    actual: dict[str, int] = {}
    in_place: set[str] = set()
    swapped_total = 0
    for rec in records:
        m = rec.step.method
        announced[m] = announced.get(m, 0) + rec.step.params_added
        if rec.installed is rec.original:
            in_place.add(m)
            continue
        seen: set[int] = set()
        n = 0
        for mod in rec.installed.modules():
            fn = getattr(mod, "adapter_params", None)
            if callable(fn):
                for p in fn().values():
                    if id(p) not in seen:
                        seen.add(id(p))
                        n += p.numel()
        actual[m] = actual.get(m, 0) + n
        swapped_total += n
    if len(in_place) == 1:  # what the swapped modules do not hold is the in-place method's
        (m,) = in_place
        actual[m] = actual.get(m, 0) + added - swapped_total
    wrong = [m for m in announced if m in actual and actual[m] != announced[m]]
    if not wrong:
        wrong = sorted(announced)
    step_of = {rec.step.method: rec.step for rec in records}
    said = {m: f"{plugin_who(registry, step_of[m], True)}: count_params announced "
                  f"{announced[m]:,}" for m in wrong}
    parts = [said[m] + (f" parameters, apply added {actual[m]:,}" if m in actual else "")
             for m in wrong]
    raise PluginError("; ".join(parts) + f" (in all: {plan.params_added:,} announced, "
                      f"{added:,} reachable through adapter_params(); the plan, `peftspec "
                      "plan` and the adapter file rely on the count). The model was left as "
                      "it was")
