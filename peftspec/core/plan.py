"""Compiling a spec against a model into a deterministic :class:`Plan`.

The compiler resolves each rule's selectors against the model's module (or
parameter) names, asks the rule's method whether it can handle each target,
finds conflicts between rules, lets plugins add checks (``check_plan``), and
reports every problem at once. Nothing in the model changes here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from operator import methodcaller, mul
from typing import Any

from torch import nn

from peftspec.core.fastmodule import gc_paused
from peftspec.core.errors import Problem, SpecError, did_you_mean
from peftspec.core.fingerprint import named_tensors, tensors_digest
from peftspec.core.packed import PackedWeight, frozen_modules, is_packed, storage_options, stored_bytes
from peftspec.core.options import selector_fields
from peftspec.core.matching import class_names, parse_selector
from peftspec.core.spec import Rule, Spec
from peftspec.core.state import base_view
from peftspec.core.step import Step, new_step as _step  # Step is part of this module's interface
from peftspec.core.registry import registry_or_default
from peftspec.core.tomlpos import LineMap

_numel = methodcaller("numel")
_element_size = methodcaller("element_size")

APPLY_ORDER = ("freeze", "reparameterize", "augment", "prefix", "train")


@dataclass(frozen=True)
class ModelIndex:
    """What compiling walked on a model: its base ``tensors`` (``(params,
    buffers)``, each by name) and its ``modules`` by path. Handed to
    :func:`peftspec.core.patching.apply_plan` by a caller that applies the plan
    at once, so that the model is walked once, not twice."""

    tensors: tuple[dict, dict]
    modules: dict[str, nn.Module]


@dataclass(frozen=True)
class RuleSummary:
    rule: str
    method: str
    line: int | None
    targets: tuple[str, ...]
    params_added: int
    params_trained: int  # existing parameters made trainable ([[train]])
    bytes: int


@dataclass(frozen=True)
class Plan:
    """The ordered steps that apply a spec to one base model."""

    spec: Spec
    steps: tuple[Step, ...]
    base_digest: str
    base_params: int
    # [[train]] picks: parameter name -> (numel, bytes)
    trained_base: dict[str, tuple[int, int]] = field(default_factory=dict)
    # each rule's options as compiled (presets expanded), by rule.where
    options: dict[str, Any] = field(default_factory=dict)
    # what a rule does to base weights, by rule.where (Method.base_note: PiSSA's residual)
    notes: dict[str, str] = field(default_factory=dict)
    # [[freeze]] targets: module path -> (bytes of its weight in float storage,
    # bytes once frozen)
    frozen: dict[str, tuple[int, int]] = field(default_factory=dict)
    # bytes of the base's parameters in float storage, and once this plan is
    # applied (weights frozen earlier, by another adapter's rules, count as stored)
    base_bytes_before: int = 0
    base_bytes_after: int = 0

    def selectors_of(self, rule: str) -> dict[str, list[str]]:
        """The selector options a rule was compiled with (after preset expansion)."""
        opts = self.options.get(rule)
        if opts is None:
            return {}
        return {f.name: list(getattr(opts, f.name)) for f in selector_fields(type(opts))}

    @cached_property  # asked by the size guard, apply and the promise check; steps are frozen
    def params_added(self) -> int:
        return sum(s.params_added for s in self.steps)

    @property
    def trainable_params(self) -> int:
        """Parameters added plus existing parameters made trainable."""
        return self.params_added + sum(n for n, _ in self.trained_base.values())

    @property
    def total_params(self) -> int:
        return self.base_params + self.params_added

    @cached_property  # asked by the size guard twice per apply
    def bytes_added(self) -> int:
        """Bytes of the tensors the steps add (``[[train]]`` picks not counted)."""
        return sum(s.bytes_added for s in self.steps)

    @property
    def adapter_bytes(self) -> int:
        """Bytes of tensor data an adapter file of this plan holds."""
        return self.bytes_added + sum(b for _, b in self.trained_base.values())

    def rules(self) -> list[RuleSummary]:
        out = []
        for rule in self.spec.rules:
            steps = [s for s in self.steps if s.rule == rule.where]
            trained = [s for s in steps if s.family == "train"]
            out.append(RuleSummary(
                rule=rule.where, method=rule.method, line=rule.line,
                targets=tuple(s.target for s in steps),
                params_added=sum(s.params_added for s in steps),
                params_trained=sum(self.trained_base[s.target][0] for s in trained),
                bytes=sum(s.bytes_added for s in steps) +
                sum(self.trained_base[s.target][1] for s in trained)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": {"name": self.spec.name, "file": self.spec.file},
            "base_params": self.base_params,
            "params_added": self.params_added,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_percent": 100.0 * self.trainable_params / max(self.total_params, 1),
            "adapter_bytes": self.adapter_bytes,
            "base_bytes": {"before": self.base_bytes_before, "after": self.base_bytes_after,
                           "frozen_modules": len(self.frozen)},
            "rules": [{"rule": r.rule, "method": r.method, "line": r.line,
                       "selectors": self.selectors_of(r.rule),
                       "matched": len(r.targets), "targets": list(r.targets),
                       "params_added": r.params_added, "params_trained": r.params_trained,
                       "bytes": r.bytes} for r in self.rules()],
            "steps": [s.to_dict() for s in self.steps],
            "base_notes": dict(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def compile_plan(spec: Spec, model: nn.Module, registry=None) -> Plan:
    """Resolve ``spec`` against ``model``.

    Raises:
        SpecError: every selector that matched nothing, every target a method
            cannot handle, every conflict between rules, and every problem a
            ``check_plan`` hook reported, all at once.
        PeftspecError: the model already carries a peftspec adapter.
    """
    return compile_with_tensors(spec, model, registry)[0]


@gc_paused
def compile_with_tensors(spec: Spec, model: nn.Module, registry=None):
    """:func:`compile_plan`, also returning the ``named_tensors(model)`` and the
    ``dict(model.named_modules())`` it read, ``(plan, (params, buffers), modules)``,
    so that :func:`peftspec.apply`, which applies at once, need not walk the model
    again."""
    registry = registry_or_default(registry)
    state = getattr(model, "_peftspec", None)
    if state is not None and state.active is not None:  # compile against the plain base
        with base_view(model):
            return compile_with_tensors(spec, model, registry)

    leaves: dict[str, dict[str, list[str]]] = {}  # _resolve_all's index (by kind)
    modules, params, buffers = _walk(model, leaves)
    types = _Types(modules, params)  # class names, for type: selectors only
    problems: list[Problem] = []

    def problem(rule: Rule, message: str, key: str | None = None, hint: str | None = None,
                item: str | None = None):
        line = _item_line(spec, rule, key, item) if item is not None else None
        problems.append(Problem(message, file=spec.file, line=line or rule.line,
                                key=f"{rule.where}.{key}" if key else rule.where, hint=hint))

    steps: list[Step] = []
    trained_base: dict[str, tuple[int, int]] = {}
    reparam_owner: dict[str, Rule] = {}
    freeze_owner: dict[str, Rule] = {}
    frozen: dict[str, tuple[int, int]] = {}
    weight_owners: dict[int, list[str]] | None = None  # built when a freeze rule needs it
    augment_owner: dict[tuple[str, str], Rule] = {}

    rules = sorted(spec.rules, key=lambda r: APPLY_ORDER.index(r.family))
    resolved: dict[str, Any] = {}
    for rule in rules:
        method = registry.method(rule.method)
        fields = selector_fields(method.Options)
        try:
            options = method.resolve_options(rule.options, model)
        except ValueError as exc:
            problem(rule, str(exc))
            continue
        resolved[rule.where] = options
        chosen: dict[str, list[str]] = {}  # target -> roles, in model order later
        if rule.family == "prefix":  # a soft prompt acts on the whole model
            chosen[""] = ["model"]
        else:
            excluded = _resolve_all(rule, "exclude", rule.exclude,
                                    "params" if rule.family == "train" else "modules", modules,
                                    types, params, problem, leaves)
            matched: set[str] = set()
            for f in fields:
                names = _resolve_all(rule, f.name, getattr(options, f.name),
                                     f.metadata["selector"], modules, types, params,
                                     problem, leaves)
                matched |= names
                for n in names:
                    if n not in excluded:
                        chosen.setdefault(n, []).append(f.name)
            if matched and not chosen and not rule.optional:
                _all_excluded(rule, matched, problem)
        order = params if rule.family == "train" else modules
        where = rule.where  # a property that formats a string: once per rule, not per target
        for target in [n for n in order if n in chosen]:
            step = _step(target, rule.method, rule.family, options, tuple(chosen[target]),
                         where, rule.line)
            if rule.family == "train":
                p = params[target]
                trained_base[target] = (p.numel(), p.numel() * p.element_size())
                steps.append(step)
                continue
            module = modules[target]
            if rule.family == "freeze":
                if weight_owners is None:
                    weight_owners = _weight_owners(modules)
                reason = _freeze_problem(model, target, module, method, step, weight_owners)
                if reason and rule.optional:  # optional: freeze what can be, skip the rest
                    continue
                if reason:
                    problem(rule, f"method '{rule.method}' cannot freeze '{target}' "
                                  f"({type(module).__name__}): {reason}")
                    continue
                if target in freeze_owner:
                    other = freeze_owner[target]
                    problem(rule, f"module '{target}' is already frozen by {other.where} "
                                  f"(line {other.line}); a weight has one storage",
                            hint="narrow one rule with 'exclude'")
                    continue
                freeze_owner[target] = rule
                w = module._parameters["weight"]
                frozen[target] = (w.numel() * w.element_size(),
                                  _stored_after(w, method, module, step))
                steps.append(step)
                continue
            reason = method.check(module, step)
            if reason:
                problem(rule, f"method '{rule.method}' cannot apply to '{target}' "
                              f"({type(module).__name__}): {reason}")
                continue
            if rule.family == "reparameterize":
                if target in reparam_owner:
                    other = reparam_owner[target]
                    problem(rule, f"module '{target}' is already reparameterized by "
                                  f"{other.where} (line {other.line}); one module takes one "
                                  "reparameterization", hint="narrow one rule with 'exclude'")
                    continue
                reparam_owner[target] = rule
            elif rule.family == "augment":
                key = (target, rule.method)
                if key in augment_owner:
                    other = augment_owner[key]
                    problem(rule, f"module '{target}' already gets '{rule.method}' from "
                                  f"{other.where} (line {other.line})",
                            hint="narrow one rule with 'exclude'")
                    continue
                augment_owner[key] = rule
            n_added = int(method.count_params(module, step))
            # Filled in before the step leaves this function (instead of building a
            # second Step: thousands of targets make a frozen dataclass's init count).
            fields = step.__dict__  # (what _step fills: a frozen dataclass's own fields)
            fields["params_added"] = n_added
            fields["bytes_added"] = n_added * _itemsize(module)
            steps.append(step)

    for name in trained_base:  # a frozen weight is stored compactly; it cannot train
        owner = name.rpartition(".")[0]
        if name.rpartition(".")[2] == "weight" and owner in freeze_owner:
            rule = next(r for r in spec.rules if r.family == "train" and
                        any(s.target == name and s.rule == r.where for s in steps))
            problem(rule, f"parameter '{name}' is frozen by {freeze_owner[owner].where} "
                          f"({freeze_owner[owner].method}); a frozen weight cannot be trained",
                    hint="exclude it from one of the two rules")
    if not problems:
        draft = Plan(spec, tuple(steps), "", 0, trained_base, resolved, frozen=frozen)
        for result in registry.pm.hook.check_plan(plan=draft):
            for item in result or ():
                problems.append(item if isinstance(item, Problem)
                                else Problem(str(item), file=spec.file))
    if problems:
        raise SpecError(problems)
    notes = {}
    for rule in spec.rules:
        where = rule.where
        note = registry.method(rule.method).base_note(resolved[where])
        if note:
            n = sum(1 for s in steps if s.rule == where)
            notes[where] = note.format(n=n, **vars(resolved[where]))
    base_params, before, after = _base_bytes(params, frozen)
    return Plan(spec, tuple(steps), tensors_digest((params, buffers)),
                base_params, trained_base, resolved, notes, frozen, before, after), \
        (params, buffers), modules


def _walk(model: nn.Module, leaves: dict | None = None
          ) -> tuple[dict[str, nn.Module], dict, dict]:
    """``dict(model.named_modules())``, ``dict(model.named_parameters())`` and
    ``dict(model.named_buffers())``: the same names, order and de-duplication
    (pre-order, each module and tensor once under its first name), in one walk
    without torch's recursive generators, which cost a third of the time on a
    model of thousands of modules. A model whose class overrides
    ``named_modules`` gets its own. ``leaves``: filled with ``"modules"``:
    :func:`_by_leaf` of the module names, on the way."""
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


def _weight_owners(modules: dict[str, nn.Module]) -> dict[int, list[str]]:
    """id of each ``weight`` parameter -> the module paths holding it (ties)."""
    owners: dict[int, list[str]] = {}
    for path, m in modules.items():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(path)
    return owners


def _freeze_problem(model, target, module, method, step, weight_owners) -> str | None:
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


def _stored_after(w, method, module, step) -> int:
    return stored_bytes(w) if is_packed(w) else int(method.stored_bytes(module, step))


def _base_bytes(params, frozen) -> tuple[int, int, int]:
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


def _itemsize(module: nn.Module) -> int:
    """Bytes per element of ``module``'s first parameter (4 if it has none)."""
    for p in module._parameters.values():  # its own come first; much cheaper than parameters()
        if p is not None:
            return p.element_size()
    return next((p.element_size() for p in module.parameters()), 4)


def _by_leaf(names) -> dict[str, list[str]]:
    """Names grouped by their last dotted atom, in the given (model) order."""
    out: dict[str, list[str]] = {}
    for n in names:
        if n:
            out.setdefault(n.rpartition(".")[2], []).append(n)
    return out


class _Types:
    """Class names (:func:`class_names`) by module path and, for parameters, of the
    module that owns each; built on first use, as only ``type:`` selectors (and a
    near-miss hint) read them."""

    def __init__(self, modules: dict[str, nn.Module], params: dict[str, Any]):
        self._modules, self._params = modules, params

    @cached_property
    def modules(self) -> dict[str, frozenset[str]]:
        return {name: class_names(m) for name, m in self._modules.items()}

    @cached_property
    def params(self) -> dict[str, frozenset[str]]:
        mt = self.modules
        return {n: mt.get(n.rpartition(".")[0], frozenset()) for n in self._params}


def _resolve_all(rule, key, selectors, kind, modules, types: _Types, params, problem,
                 leaves: dict | None = None) -> set[str]:
    """The names ``selectors`` pick. ``leaves``: a cache (by kind) of :func:`_by_leaf`,
    shared across a compile: a ``**.name`` selector (nearly every selector) only
    tests the names ending in its last atom, not every module of a deep model."""
    found: set[str] = set()
    for text in selectors:
        sel = parse_selector(text)
        pool = params if kind == "params" else modules
        if sel.literal is not None and sel.literal[0] == "suffix" and leaves is not None:
            if kind not in leaves:
                leaves[kind] = _by_leaf(pool)
            pool = leaves[kind].get(sel.literal[1].rpartition(".")[2], ())
        if sel.kind == "type":
            owners = types.params if kind == "params" else types.modules
            hits = [n for n in pool if n and sel.matches(n, owners[n])]
        else:  # globs and regular expressions read the name only
            hits = [n for n in pool if n and sel.matches(n)]
        if not hits and not rule.optional:
            pool = params if kind == "params" else modules
            problem(rule, f"selector '{text}' matched no {'parameter' if kind == 'params' else 'module'}",
                    key=key, hint=_near_miss(text, pool, types.modules, kind),
                    item=text)
        found.update(hits)
    return found


def _all_excluded(rule: Rule, matched: set[str], problem) -> None:
    """Report a rule whose selectors match only names its own ``exclude`` removes:
    the same error as a selector that matches nothing (the rule would do nothing),
    at the ``exclude`` list's line."""
    what = "parameter" if rule.family == "train" else "module"
    shown = ", ".join(f"'{n}'" for n in sorted(matched)[:3]) + (", ..." if len(matched) > 3 else "")
    problem(rule, f"every {what} this rule's selectors match ({len(matched)}: {shown}) is "
                  "removed by its own 'exclude'; the rule would change nothing",
            key="exclude", item=rule.exclude[0],
            hint="narrow 'exclude' or the selectors, or set 'optional = true' to allow an "
                 "empty rule")


def _item_line(spec: Spec, rule: Rule, key: str, item: str) -> int | None:
    """The line that holds selector ``item`` of ``rule``'s ``key`` (the item's own
    line in a multi-line list), not the rule's first line; ``None`` when the spec
    text has no such key (a selector a preset expanded to). Only computed for a
    problem, so re-reading the text costs nothing on a good spec."""

    path = (rule.family,) if rule.family == "prefix" else (rule.family, rule.index)
    lines = LineMap(spec.text)
    if path + (key,) not in lines.lines:
        return None
    return lines.line_of_item(path + (key,), item)


def _fix_segments(text: str, names) -> str | None:
    """``text`` with each misspelt literal segment replaced by the closest name
    segment of the model, if the result matches something (wildcards kept)."""
    import difflib

    atoms = sorted({a for n in names if n for a in n.split(".")})
    known = set(atoms)
    segments = text.split(".")
    changed = False
    for i, seg in enumerate(segments):
        if not seg or any(c in seg for c in "*?") or seg in known:
            continue
        close = difflib.get_close_matches(seg, atoms, n=1, cutoff=0.6)
        if not close:
            return None
        segments[i], changed = close[0], True
    if not changed:
        return None
    fixed = ".".join(segments)
    try:
        sel = parse_selector(fixed)
    except ValueError:
        return None
    return fixed if any(n and sel.matches(n) for n in names) else None


def _near_miss(text: str, names, module_types, kind: str) -> str:
    """A hint in the selector's own form: ``**.v_prj`` gets ``did you mean
    '**.v_proj'?`` (a selector that matches), not the bare leaf name."""
    if text.startswith("type:"):
        types = sorted({t for ts in module_types.values() for t in ts
                        if t not in ("Module", "object")})
        close = did_you_mean(text[5:], types)
        return (f"did you mean 'type:{close.split(chr(39))[1]}'?" if close else
                f"module types here: {', '.join(types[:12])}")
    fixed = None if text.startswith("re:") else _fix_segments(text, names)
    if fixed:
        return f"did you mean '{fixed}'?"
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    hint = did_you_mean(text.rsplit(".", 1)[-1], leaves)
    if hint:
        return hint
    sample = [n for n in names if n][:6]
    return (f"no {kind} name ends like that; `peftspec plan` lists names, e.g. "
            f"{', '.join(sample)}")
