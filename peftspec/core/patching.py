"""Applying plans to a model, switching between adapters, and undoing them.

``apply_plan`` swaps or augments the planned modules, then freezes every
parameter except the adapter's and the ones ``[[train]]`` selected. Base
tensors stay the same objects with the same bits.

A model may carry several named adapters over one base
(:mod:`peftspec.core.state` holds them and switches between them).
:func:`remove` restores the
original modules, values and ``requires_grad`` flags exactly, and
:func:`merge` folds the active adapter's reparameterizations into the base
weights.

If anything fails half-way, what was applied is rolled back before the error
propagates: the model is never left half-patched.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from peftspec.core.fastmodule import gc_paused
from peftspec.core.errors import NotMergeableError, PeftspecError, PluginError
from peftspec.core.fingerprint import named_tensors, tensors_digest
from peftspec.core.blame import context, plugin_hook, reraise
from peftspec.core.buffers import buffer_keys, new_base_buffers
from peftspec.core.capabilities import SharesRuleState
from peftspec.core.method import Method
from peftspec.core.sizeguard import check_fits
from peftspec.core.plan import ModelIndex, Plan
from peftspec.core.freeze import freeze_steps
from peftspec.core.barrier import built_in
from peftspec.core.promise import BaseSnapshot, kept_by_name, verify
from peftspec.core.valueguard import ValueGuard
from peftspec.core.registry import registry_or_default
from peftspec.core.state import (  # noqa: F401 (public names re-exported: the apply API)
    Adapter, DEFAULT_NAME, PatchState, Record, active_adapter, adapter_names, base_view, disabled,
    install, install_adapter, is_patched, parent_finder, registration_hooks, requires_grad_of,
    set_child, set_trainable, state_of, uninstall_active, use, using)

# --- apply and remove ----------------------------------------------------------------

@gc_paused
def apply_plan(plan: Plan, model: nn.Module, registry=None, *,
               name: str = DEFAULT_NAME, activate: bool | None = None,
               force: bool = False, index: ModelIndex | None = None,
               freeze_log: list | None = None) -> nn.Module:
    """Execute ``plan`` on ``model`` in place, as adapter ``name``; return the model.

    The first adapter on a model becomes active. A further one is loaded beside
    the active one and stays inactive unless ``activate=True``.

    Raises:
        PeftspecError: an adapter of that name is loaded already, or the model
            is not the one the plan was compiled for.
        AdapterTooLarge: the adapter would add more parameters than the base
            has, or more bytes than the memory available (``force`` skips this
            check, made before anything is allocated).

    ``index``: what compiling ``plan`` walked on this very model a moment ago
    (:func:`peftspec.core.plan.compile_with_tensors`), so that applying need not
    walk it again; the caller vouches that the model has not changed since and
    that the plan's size was checked. ``freeze_log``: a list that receives the
    ``[[freeze]]`` step's undo record; the caller then commits it, or undoes it
    if its own next step fails (:func:`peftspec.load_adapter` does).
    """
    _tensors = index.tensors if index is not None else None
    _modules = index.modules if index is not None else None
    if _tensors is None:  # (peftspec.apply checked it a moment ago, training included)
        check_fits(plan, force=force)
    registry = registry_or_default(registry)
    state = getattr(model, "_peftspec", None)
    if state is not None and name in state.adapters:
        raise PeftspecError(f"an adapter named {name!r} is already loaded on this model; "
                            "give another name or remove it first")
    previous = state.active if state is not None else None
    if state is not None:
        uninstall_active(model, state)
    if _tensors is not None:  # peftspec.apply: compiled from this model a moment ago
        params, buffers = _tensors
    else:
        params, buffers = named_tensors(model)
    if _tensors is None and tensors_digest((params, buffers)) != plan.base_digest:
        if state is not None and previous is not None:
            install_adapter(model, state, previous)
        raise PeftspecError("this plan was compiled for a different model (tensor names or "
                            "shapes differ); compile it against this model")
    try:  # [[freeze]] first: the adapters are built over the packed base weights
        frozen = freeze_steps(model, plan, registry)
    except BaseException:
        if state is not None and previous is not None:
            install_adapter(model, state, previous)
        raise
    if frozen.changed:
        params, buffers = named_tensors(model)
        if state is not None:  # the originals must not stay referenced (memory)
            swap = frozen.replaced()
            state.requires_grad = [(swap.get(id(p), p), flag) for p, flag in state.requires_grad]
    snapshot = BaseSnapshot(params, buffers)  # checked after apply: the promise
    fresh = state is None
    if fresh:
        base = list(params.values())
        state = PatchState(requires_grad=list(zip(base, map(requires_grad_of, base))),
                           base_buffer_names=list(buffers))
    adapter = Adapter(name, plan, registry=registry)
    try:
        parent_of = parent_finder(model)
        # peftspec.apply's compile walked this model a moment ago: its path -> module
        # dict (apply's own) finds each target and its parent at once. It is kept
        # true while only leaves are replaced; below a replaced module with children
        # a path may lead elsewhere now, and [[freeze]] may swap modules: then the
        # model is walked.
        known = _modules if not frozen.changed else None
        # whether every step so far kept the original's tensors (kept_by_name), for
        # verify; None: not known
        kept: bool | None = True
        done: set[str] = set()  # the targets installed so far
        built: set[int] = set()  # ids of the modules the steps so far built
        prepared: set[str] = set()
        # looked up once per method, not per step; with whether it shares state
        # across a rule (a protocol isinstance costs microseconds: not per target)
        methods: dict[str, tuple[Method, bool]] = {}
        hooks = registration_hooks()
        # peftspec's own methods run without the write barrier (core.barrier.built_in)
        methods_built_in = {m: built_in(registry.methods.get(m)) for m in
                            {s.method for s in plan.steps if s.family not in ("train", "freeze")}}
        # the base tensors' values, compared where a step fails and after the last
        # (the promise); a rule that announced a rewritten base (PiSSA's) is exempt;
        # after_apply hooks run outside any barrier: then every tensor sampled up front
        after_hooks = bool(registry.pm.hook.after_apply.get_hookimpls())
        guard = ValueGuard(snapshot, tuple(s.target for s in plan.steps if s.rule in plan.notes),
                           sample=after_hooks)
        for step in plan.steps:
            if step.family in ("train", "freeze"):
                continue
            known_method = methods.get(step.method)
            if known_method is None:
                m = registry.method(step.method)
                known_method = methods[step.method] = (m, isinstance(m, SharesRuleState))
            method, shares_state = known_method
            if shares_state and step.rule not in prepared:
                prepared.add(step.rule)  # the rule's modules, before any of them is swapped
                mine = [s for s in plan.steps if s.rule == step.rule]
                barrier = None if methods_built_in[step.method] else guard.barrier()
                try:
                    with barrier or contextlib.nullcontext():  # as apply, below
                        method.prepare({s.target: _module_at(model, parent_of, s.target)
                                        for s in mine}, mine)
                except Exception as exc:  # noqa: BLE001 - named (core.blame)
                    guard.raise_refused(registry, step, barrier, exc)
                    reraise(exc, registry, mine, "prepare", plan.spec.file)
                guard.raise_refused(registry, step, barrier)  # swallowed by the plugin
            path, _, child = step.target.rpartition(".")
            if not child:  # "": the model itself
                parent = original = model
            elif known is not None:
                parent, original = known[path], known[step.target]
            else:
                parent = parent_of(path)
                # a target is a child in its parent's _modules (compiled from
                # named_modules): read there, not through nn.Module.__getattr__
                original = (parent._modules[child] if child in parent._modules
                            else getattr(parent, child))
            keys = buffer_keys(original)
            # a plugin's torch writes into the base refused before they happen
            barrier = None if methods_built_in[step.method] else guard.barrier()
            try:
                if barrier is None:
                    installed = method.apply(original, step)
                else:
                    with barrier:
                        installed = method.apply(original, step)
            except BaseException as exc:
                guard.raise_refused(registry, step, barrier, exc)
                guard.check(registry, plan, failed=step)  # the write, named first
                if not isinstance(exc, Exception):
                    raise
                reraise(exc, registry, step, "apply", plan.spec.file, target=step.target)
            guard.raise_refused(registry, step, barrier)  # swallowed by the plugin
            if len(original._buffers) != len(keys) and id(original) not in built:
                _refuse_base_buffers(registry, plan, step, original, keys)
            adapter.records.append(Record(step, method, original, installed))
            if installed is not original:
                built.add(id(installed))
            if kept:  # checked now, while both modules are fresh in the cache
                if step.target in done:
                    # a second method on one module: it may have changed the first's
                    # module since that was checked, so verify checks them all after
                    kept = None
                else:
                    done.add(step.target)
                    kept = kept_by_name(original, installed)
            if installed is not original:
                set_child(parent, child, installed, hooks)
                if known is not None:
                    if original._modules:
                        known = None
                    else:  # a second rule on this module (LoRA, then IA3) gets this one
                        known[step.target] = installed
        for pname in adapter.trained_base_names():
            if pname not in state.base_values:
                p = params[pname]
                state.base_values[pname] = (p, p.detach().clone())
        state.adapters[name] = adapter
        state.active = name
        model.__dict__["_peftspec"] = state
        adapter_tensors = set_trainable(model, state, adapter, params.values())
        guard.check(registry, plan)
        if after_hooks:
            plugin_hook(registry, "after_apply", plan.spec.file, model=model, plan=plan)
            guard.check(registry, None)  # what changed now, a hook wrote
        # an after_apply hook may have changed the modules since: then verify looks again
        verify(model, snapshot, adapter_tensors, plan, adapter.records, registry,
               kept=None if after_hooks else kept)
    except BaseException:
        state.adapters.pop(name, None)
        state.active = None
        _undo_records(model, adapter.records)
        snapshot.restore()
        for rec in adapter.records:
            rec.method.release(rec.installed, rec.original, rec.step)
        model.__dict__["_peftspec"] = state
        frozen.undo(model)
        _finish(model, state, previous)
        raise
    if freeze_log is not None:  # the caller commits, or undoes if its next step fails
        freeze_log.append(frozen)
    else:
        frozen.commit()
    if previous is not None and not activate:
        uninstall_active(model, state)
        install_adapter(model, state, previous)
    return model


def _refuse_base_buffers(registry, plan, step, original: nn.Module, keys) -> None:
    added = new_base_buffers(original, keys)
    if not added:
        return
    names = ", ".join(f"'{'.'.join(p for p in (step.target, k) if p)}'" for k in added[:3])
    raise PluginError(
        f"{context(registry, step, plan.spec.file)} registered buffer {names} on the module "
        f"it was given ('{step.target or '<model>'}', a base module) during apply; it would "
        "stay on the base when the adapter is switched off. Register buffers on a module "
        "apply builds (the one it returns, or a child of it): those are adapter state. The "
        "model was left as it was")


def _module_at(model: nn.Module, parent_of, target: str) -> nn.Module:
    path, _, child = target.rpartition(".")
    return getattr(parent_of(path), child) if child else model


def _undo_records(model: nn.Module, records: list[Record]) -> None:
    for rec in reversed(records):
        rec.method.detach(rec.installed, rec.original, rec.step)
        if rec.installed is not rec.original:
            install(model, rec.step.target, rec.original)


def _finish(model: nn.Module, state: PatchState, activate: str | None) -> None:
    """After an adapter is gone: reactivate one, or restore the plain base."""
    if activate is not None and activate in state.adapters and state.active is None:
        install_adapter(model, state, activate)
        return
    if state.adapters:
        model.__dict__["_peftspec"] = state
        return
    with torch.no_grad():
        for param, value in state.base_values.values():
            param.copy_(value)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    model.__dict__.pop("_peftspec", None)


def remove(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take adapter ``name`` off (all adapters when ``None``).

    With the last adapter gone, the original modules are back and
    ``requires_grad`` is as before the first apply. Base weights are the same
    tensor objects, bit-identical to before, including base parameters that
    ``[[train]]`` trained: their values at apply time are restored (use
    :func:`merge` to keep them).
    """
    state = state_of(model)
    names = list(state.adapters) if name is None else [name]
    for n in names:
        if n not in state.adapters:
            raise PeftspecError(f"no adapter named {n!r} on this model; loaded: "
                                f"{', '.join(state.adapters)}")
    for n in names:
        if state.active == n:
            uninstall_active(model, state)
        gone = state.adapters.pop(n)
        for rec in gone.records:
            try:
                rec.method.release(rec.installed, rec.original, rec.step)
            except Exception as exc:  # noqa: BLE001 - named (core.blame)
                reraise(exc, gone.registry, rec.step, "release", gone.plan.spec.file,
                        target=rec.step.target)
    _finish(model, state, None)  # the base is active if the active adapter went
    return model


# --- merge -----------------------------------------------------------------------------

def tied_targets(model: nn.Module, targets) -> list[str]:
    """Which of ``targets`` (``(step, module at step.target)`` pairs, to be merged)
    hold a parameter shared with another module (tied): merging would write the
    shared tensor and change that module too. One line per tie, for the error."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(path)
    out = []
    for step, module in targets:
        for pname, p in module.named_parameters(recurse=False):
            others = [o for o in owners.get(id(p), []) if o != step.target]
            if others:
                out.append(f"{step.method} on '{step.target}' ({step.rule}): its "
                           f"{pname} is tied to '{others[0]}'")
    return out


def refuse_tied(model: nn.Module, targets) -> None:
    """Raise :class:`NotMergeableError` naming every tie :func:`tied_targets` finds."""
    tied = tied_targets(model, targets)
    if tied:
        raise NotMergeableError(
            "cannot merge: " + "; ".join(tied) + ". Merging would write the shared tensor "
            "and change the other module too; untie the weights first (e.g. clone the "
            "embedding into the head) or keep this adapter unmerged")


def merge(model: nn.Module, *, skip_unmergeable: bool = False) -> nn.Module:
    """Fold the active adapter into the base weights; return the plain model.

    This is the one operation that writes base weights. Methods that cannot be
    merged make it fail before anything changes, naming them, unless
    ``skip_unmergeable`` is set: then those are removed instead. Other loaded
    adapters are dropped (they were trained against the unmerged base).
    """
    state = state_of(model)
    records = state.records
    refuse_tied(model, [(r.step, r.original) for r in records if r.method.mergeable])
    blocked = [r for r in records if not r.method.mergeable]
    if blocked and not skip_unmergeable:
        names = sorted({f"{r.step.method} ({r.step.rule})" for r in blocked})
        raise NotMergeableError("cannot merge: " + ", ".join(names) + " add computation that "
                                "does not fold into base weights (pass skip_unmergeable=True / "
                                "--skip-unmergeable to drop them)")
    registry, file = state.current.registry, state.plan.spec.file
    for rec in reversed(records):
        try:
            if rec.method.mergeable:
                merged = rec.method.merge(rec.installed, rec.original)
            else:
                rec.method.detach(rec.installed, rec.original, rec.step)
                merged = rec.original
        except Exception as exc:  # noqa: BLE001 - named (core.blame)
            reraise(exc, registry, rec.step, "merge" if rec.method.mergeable else "detach",
                    file, target=rec.step.target)
        if merged is not rec.installed:
            install(model, rec.step.target, merged)
    for adapter in state.adapters.values():
        for rec in adapter.records:
            rec.method.release(rec.installed, rec.original, rec.step)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    model.__dict__.pop("_peftspec", None)
    return model
