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
from operator import methodcaller
from typing import Any

from torch import nn

from peftspec.core.fastmodule import gc_paused
from peftspec.core.errors import PeftspecError, Problem, SpecError
from peftspec.core.fingerprint import tensors_digest
from peftspec.core.options import named_key, selector_fields
from peftspec.core.blame import OPTION_REFUSALS, plugin_hook, reraise, who
from peftspec.core.tomlpos import LineMap
from peftspec.core.spec import Rule, Spec
from peftspec.core.state import base_view
from peftspec.core.step import Step, new_step as _step  # Step is part of this module's interface
from peftspec.core.registry import registry_or_default
from peftspec.core.model_walk import walk, find_weight_owners, freeze_problem, stored_after, base_bytes, itemsize
from peftspec.core.resolve import ModuleTypes, resolve_all, all_excluded, item_line

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

    leaves: dict[str, dict[str, list[str]]] = {}  # resolve_all's index (by kind)
    modules, params, buffers = walk(model, leaves)
    types = ModuleTypes(modules, params)  # class names, for type: selectors only
    problems: list[Problem] = []

    def problem(rule: Rule, message: str, key: str | None = None, hint: str | None = None,
                item: str | None = None):
        line = item_line(spec, rule, key, item) if item is not None else None
        problems.append(Problem(message, file=spec.file, line=line or rule.line,
                                key=f"{rule.where}.{key}" if key else rule.where, hint=hint))

    linemap: list[LineMap] = []  # the spec's lines, read at the first refusal only

    def refused(rule: Rule, message: str, about: object) -> None:
        """A method refused the rule: at the line of the option ``about`` (an
        OptionError, or a message naming one key of the rule) where the TOML has one."""
        if not linemap:
            linemap.append(LineMap(spec.text))
        lines = linemap[0].lines
        path = (rule.family,) if rule.family == "prefix" else (rule.family, rule.index)
        keys = [p[-1] for p in lines if len(p) == len(path) + 1 and p[:-1] == path]
        key = named_key(about, keys, registry.method(rule.method).Options)
        problems.append(Problem(message, file=spec.file,
                                line=lines.get(path + (key,)) if key else rule.line,
                                key=f"{rule.where}.{key}" if key else rule.where))

    said: set[tuple[str, str]] = set()  # (rule, refusal) raised by a method: said once
    raised: list[Exception] = []  # those refusals: the first is chained to the SpecError

    def refusal(exc: Exception, rule: Rule, step: Step, hook: str, target: str | None,
                kind: str = "") -> None:
        """``exc`` from ``hook``: a refusal becomes the rule's problem; anything else is
        re-raised, naming the plugin (core.blame)."""
        if not (isinstance(exc, OPTION_REFUSALS) or
                isinstance(exc, PeftspecError) and exc.exit_code == 2):
            reraise(exc, registry, step, hook, spec.file, target=target)
        if (rule.where, str(exc)) in said:  # the same words for each module it matched
            return
        said.add((rule.where, str(exc)))
        raised.append(exc)
        on = f" '{target}' ({kind})" if target is not None else " the rule"
        refused(rule, f"{who(registry, rule.method)} refused{on} in {hook}: {exc}", exc)

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
        except OPTION_REFUSALS as exc:
            refused(rule, str(exc), exc)
            continue
        except Exception as exc:  # noqa: BLE001 - the plugin failing: named (core.blame)
            reraise(exc, registry, _step("", rule.method, rule.family, None, (), rule.where,
                                         rule.line), "resolve_options", spec.file)
        resolved[rule.where] = options
        chosen: dict[str, list[str]] = {}  # target -> roles, in model order later
        if rule.family == "prefix":  # a soft prompt acts on the whole model
            chosen[""] = ["model"]
        else:
            excluded = resolve_all(rule, "exclude", rule.exclude,
                                    "params" if rule.family == "train" else "modules", modules,
                                    types, params, problem, leaves)
            matched: set[str] = set()
            for f in fields:
                names = resolve_all(rule, f.name, getattr(options, f.name),
                                     f.metadata["selector"], modules, types, params,
                                     problem, leaves)
                matched |= names
                for n in names:
                    if n not in excluded:
                        chosen.setdefault(n, []).append(f.name)
            if matched and not chosen and not rule.optional:
                all_excluded(rule, matched, problem)
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
                    weight_owners = find_weight_owners(modules)
                try:
                    reason = freeze_problem(model, target, module, method, step, weight_owners)
                except Exception as exc:  # noqa: BLE001 - refused, or the plugin failing
                    refusal(exc, rule, step, "check", target, type(module).__name__)
                    continue
                if reason and rule.optional:  # optional: freeze what can be, skip the rest
                    continue
                if reason:
                    refused(rule, f"method '{rule.method}' cannot freeze '{target}' "
                                  f"({type(module).__name__}): {reason}", reason)
                    continue
                if target in freeze_owner:
                    other = freeze_owner[target]
                    problem(rule, f"module '{target}' is already frozen by {other.where} "
                                  f"(line {other.line}); a weight has one storage",
                            hint="narrow one rule with 'exclude'")
                    continue
                freeze_owner[target] = rule
                w = module._parameters["weight"]
                try:
                    stored = stored_after(w, method, module, step)
                except Exception as exc:  # noqa: BLE001
                    refusal(exc, rule, step, "stored_bytes", target, type(module).__name__)
                    continue
                frozen[target] = (w.numel() * w.element_size(), stored)
                steps.append(step)
                continue
            try:
                reason = method.check(module, step)
            except Exception as exc:  # noqa: BLE001 - refused, or the plugin failing
                refusal(exc, rule, step, "check", target, type(module).__name__)
                continue
            if reason:
                refused(rule, f"method '{rule.method}' cannot apply to '{target}' "
                              f"({type(module).__name__}): {reason}", reason)
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
            try:
                n_added = int(method.count_params(module, step))
            except Exception as exc:  # noqa: BLE001
                refusal(exc, rule, step, "count_params", target, type(module).__name__)
                continue
            # Filled in before the step leaves this function (instead of building a
            # second Step: thousands of targets make a frozen dataclass's init count).
            fields = step.__dict__  # (what _step fills: a frozen dataclass's own fields)
            fields["params_added"] = n_added
            fields["bytes_added"] = n_added * itemsize(module)
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
        for result in plugin_hook(registry, "check_plan", spec.file, plan=draft):
            for item in result or ():
                problems.append(item if isinstance(item, Problem)
                                else Problem(str(item), file=spec.file))
    if problems:
        raise SpecError(problems) from (raised[0] if raised else None)
    notes = {}
    for rule in spec.rules:
        where = rule.where
        try:
            note = registry.method(rule.method).base_note(resolved[where])
        except Exception as exc:  # noqa: BLE001
            reraise(exc, registry, _step("", rule.method, rule.family, None, (), where,
                                         rule.line), "base_note", spec.file)
        if note:
            n = sum(1 for s in steps if s.rule == where)
            notes[where] = note.format(n=n, **vars(resolved[where]))
    base_params, before, after = base_bytes(params, frozen)
    return Plan(spec, tuple(steps), tensors_digest((params, buffers)),
                base_params, trained_base, resolved, notes, frozen, before, after), \
        (params, buffers), modules
