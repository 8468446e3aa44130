"""The compiler's first phase: one walk over the model (its modules, parameters
and buffers, and an index of names by their last segment), and what the plan
reports of the base (its bytes, what a freeze method may take)."""

from __future__ import annotations

from itertools import repeat
from operator import methodcaller, mul
from typing import Any

from torch import nn

from peftspec.core.fingerprint import named_tensors
from peftspec.core.packed import PackedWeight, frozen_modules, is_packed, storage_options, stored_bytes

_numel = methodcaller("numel")
_element_size = methodcaller("element_size")


def walk(model: nn.Module, leaves: dict | None = None
          ) -> tuple[dict[str, nn.Module], dict, dict]:
    """``dict(model.named_modules())``, ``dict(model.named_parameters())`` and
    ``dict(model.named_buffers())``: the same names, order and de-duplication
    (pre-order, each module and tensor once under its first name), in one walk
    without torch's recursive generators, which cost a third of the time on a
    model of thousands of modules. A model whose class overrides
    ``named_modules`` gets its own. ``leaves``: filled with ``"modules"``:
    :func:`by_leaf` of the module names, on the way."""
    if type(model).named_modules is not nn.Module.named_modules:
        modules = dict(model.named_modules())
        return (modules, *named_tensors(model, modules))
    by_leaf: dict[str, list[str]] = {}
    if leaves is not None:
        leaves["modules"] = by_leaf
    modules: dict[str, nn.Module] = {}
    params: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    seen: set[int] = set()
    seen_params: set[int] = set()  # by id(): what torch's de-duplication compares
    seen_buffers: set[int] = set()
    stack = [("", "", model)]  # (path, its last atom, module)
    pop, push = stack.pop, stack.append
    while stack:
        prefix, leaf, module = pop()
        if id(module) in seen:  # marked when visited, not when pushed: as torch does
            continue
        seen.add(id(module))
        modules[prefix] = module
        if prefix:
            group = by_leaf.get(leaf)
            if group is None:
                by_leaf[leaf] = [prefix]
            else:
                group.append(prefix)
            dot = prefix + "."
        else:
            dot = ""
        for key, t in module._parameters.items():
            if t is not None and id(t) not in seen_params:
                seen_params.add(id(t))
                params[dot + key] = t
        if module._buffers:
            for key, t in module._buffers.items():
                if t is not None and id(t) not in seen_buffers:
                    seen_buffers.add(id(t))
                    buffers[dot + key] = t
        children = module._modules
        if children:
            for name, child in reversed(children.items()):  # first child on top
                if child is not None and id(child) not in seen:
                    # (a name with a dot, put into _modules by hand: its last atom)
                    push((dot + name, name.rpartition(".")[2] if "." in name else name,
                          child))
    return modules, params, buffers


def find_weight_owners(modules: dict[str, nn.Module]) -> dict[int, list[str]]:
    """id of each ``weight`` parameter -> the module paths holding it (ties)."""
    owners: dict[int, list[str]] = {}
    for path, m in modules.items():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(path)
    return owners


def freeze_problem(model, target, module, method, step, weight_owners) -> str | None:
    """Why ``module`` cannot be frozen by ``step``, or None. A module frozen
    already (by an adapter loaded earlier) passes when the storage is the same."""
    w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    if w is None:
        return "it has no 'weight' parameter"
    others = [p for p in weight_owners.get(id(w), []) if p != target]
    if others:
        return (f"its weight is tied to '{others[0]}'; freezing it would change that module "
                "too (untie the weights, or exclude one of them)")
    if is_packed(w):
        entry = frozen_modules(model).get(target)
        wanted = (step.method, storage_options(step.options))
        if entry is not None and (entry.method, entry.options) == wanted:
            return None
        have = f"{entry.method} {entry.options}" if entry else w.codec.name
        return (f"it is stored as {have} already (frozen by an adapter loaded earlier); a "
                "base has one storage: load this adapter onto a fresh copy of the base")
    return method.check(module, step)


def stored_after(w, method, module, step) -> int:
    """Bytes ``w`` will occupy once the freeze ``method`` has packed it (already packed: as is)."""
    return stored_bytes(w) if is_packed(w) else int(method.stored_bytes(module, step))


def base_bytes(params, frozen) -> tuple[int, int, int]:
    """The base's parameter count, its bytes in float storage, and its bytes after
    the plan's freeze (one pass: a deep model has thousands of parameters)."""
    tensors = list(params.values())
    if not frozen and not any(map(isinstance, tensors, repeat(PackedWeight))):  # in C
        numels = list(map(_numel, tensors))
        dense = sum(map(mul, numels, map(_element_size, tensors)))
        return sum(numels), dense, dense
    count = before = after = 0
    for name, p in params.items():
        n = p.numel()
        count += n
        dense = n * p.element_size()  # a packed weight reports the original dtype
        before += dense
        if not frozen and not isinstance(p, PackedWeight):  # the common case
            after += dense
            continue
        owner = name[:-len(".weight")] if name.endswith(".weight") else \
            ("" if name == "weight" else None)
        if owner is not None and owner in frozen:
            after += frozen[owner][1]
        elif isinstance(p, PackedWeight):
            after += stored_bytes(p)
        else:
            after += dense
    return count, before, after


def itemsize(module: nn.Module) -> int:
    """Bytes per element of ``module``'s first parameter (4 if it has none)."""
    for p in module._parameters.values():  # its own come first; much cheaper than parameters()
        if p is not None:
            return p.element_size()
    return next((p.element_size() for p in module.parameters()), 4)
