"""Applying plans to a model, switching between adapters, and undoing them.

``apply_plan`` swaps or augments the planned modules, then freezes every
parameter except the adapter's and the ones ``[[train]]`` selected. Base
tensors stay the same objects with the same bits.

A model may carry several named adapters over one base (``model._peftspec``
records them). At most one is *active*: its modules are installed and its
``[[train]]`` values sit in the base tensors they train. Switching
(:func:`use`, :func:`disabled`) uninstalls one adapter's modules and installs
another's; no frozen base weight is copied. :func:`remove` restores the
original modules, values and ``requires_grad`` flags exactly, and
:func:`merge` folds the active adapter's reparameterizations into the base
weights.

If anything fails half-way, what was applied is rolled back before the error
propagates: the model is never left half-patched.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter, methodcaller
from typing import Iterator

import torch
from torch import nn

from peftspec.core.fastmodule import all_modules, gc_paused
from peftspec.core.errors import NotMergeableError, PeftspecError
from peftspec.core.fingerprint import named_tensors, tensors_digest
from peftspec.core.method import Method
from peftspec.core.sizeguard import check_fits
from peftspec.core.plan import Plan, Step
from peftspec.core.freeze import freeze_steps
from peftspec.core.promise import BaseSnapshot, kept_by_name, verify

DEFAULT_NAME = "default"

_requires_grad = attrgetter("requires_grad")
_freeze = methodcaller("requires_grad_", False)


@dataclass(slots=True)  # one per target: thousands on a deep model
class Record:
    step: Step
    method: Method
    original: nn.Module
    installed: nn.Module


@dataclass
class Adapter:
    """One adapter on the model: its plan, its modules, its ``[[train]]`` values."""

    name: str
    plan: Plan
    records: list[Record] = field(default_factory=list)
    # values of the base parameters its [[train]] rules train, kept here while
    # another adapter (or the base) is active
    stashed: dict[str, torch.Tensor] | None = None

    def trained_base_names(self) -> list[str]:
        return [s.target for s in self.plan.steps if s.family == "train"]


@dataclass
class PatchState:
    """What peftspec did to a model; kept as ``model._peftspec``."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    active: str | None = None
    # requires_grad of every base parameter before the first adapter
    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    # base values of parameters any adapter's [[train]] rules train
    base_values: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)

    @property
    def current(self) -> Adapter:
        if self.active is None:
            raise PeftspecError("no adapter is active (the base model is); "
                                "call peftspec.use(model, name) first")
        return self.adapters[self.active]

    # the active adapter's plan and records (what save and merge act on)
    @property
    def plan(self) -> Plan:
        return self.current.plan

    @property
    def records(self) -> list[Record]:
        return self.current.records

    def trained_base_names(self) -> list[str]:
        return self.current.trained_base_names()


def state_of(model: nn.Module) -> PatchState:
    st = getattr(model, "_peftspec", None)
    if st is None:
        raise PeftspecError("this model has no peftspec adapter (apply a spec first)")
    return st


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_peftspec", None) is not None


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters loaded on ``model``, in load order."""
    st = getattr(model, "_peftspec", None)
    return list(st.adapters) if st else []


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name; ``None`` when the base model is active."""
    st = getattr(model, "_peftspec", None)
    return st.active if st else None


def _install(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    _set_child(parent, child, module)


def _set_child(parent: nn.Module, name: str, module: nn.Module,
               hooks: bool | None = None) -> None:
    """``setattr(parent, name, module)`` for an existing child ``name``.

    Where that would only store it in ``parent._modules`` (a plain ``nn.Module``
    ``__setattr__``, no global module-registration hooks), it stores it there
    directly: ``nn.Module.__setattr__`` costs microseconds, thousands of times.
    ``hooks``: :func:`_registration_hooks`, where the caller asked it once for many."""
    if hooks is None:
        hooks = _registration_hooks()
    if (type(parent).__setattr__ is nn.Module.__setattr__ and name in parent._modules
            and not hooks):
        parent._modules[name] = module
    else:
        setattr(parent, name, module)


def _registration_hooks() -> bool:
    hooks = getattr(nn.modules.module, "_global_module_registration_hooks", None)
    return hooks is None or bool(hooks)  # unknown torch: take the safe, slow path


def _parent_finder(model: nn.Module):
    """``parent_of(path)``: the module at dotted ``path``, for paths asked in model order.

    Consecutive targets share most of their path (``layers.7.attn.q``,
    ``layers.7.attn.k``, ``layers.7.mlp.up``), so only the atoms after the
    prefix shared with the previous path are looked up, not the whole path
    (``get_submodule`` on a deep path costs tens of microseconds). This is
    safe while modules are only installed *below* the last path asked for:
    the remembered chain holds that path and its ancestors, never a replaced
    module.
    """
    chain: list[tuple[str, nn.Module]] = [("", model)]  # (atom, module), root first
    last = [None, model]  # the path asked last and its module: targets share parents

    def parent_of(path: str) -> nn.Module:
        if path == last[0]:
            return last[1]
        atoms = path.split(".") if path else []
        keep = 0
        while keep < len(atoms) and keep + 1 < len(chain) and chain[keep + 1][0] == atoms[keep]:
            keep += 1
        del chain[keep + 1:]
        for atom in atoms[keep:]:
            chain.append((atom, getattr(chain[-1][1], atom)))
        last[0], last[1] = path, chain[-1][1]
        return last[1]

    return parent_of


# --- switching ---------------------------------------------------------------------

def _deactivate(model: nn.Module, state: PatchState) -> None:
    """Uninstall the active adapter: original modules back, base values back."""
    if state.active is None:
        return
    adapter = state.adapters[state.active]
    for rec in reversed(adapter.records):
        rec.method.detach(rec.installed, rec.original, rec.step)
        if rec.installed is not rec.original:
            _install(model, rec.step.target, rec.original)
    trained = adapter.trained_base_names()
    if trained:
        with torch.no_grad():
            adapter.stashed = {}
            for name in trained:
                param, base = state.base_values[name]
                adapter.stashed[name] = param.detach().clone()
                param.copy_(base)
    for p in model.parameters():
        p.requires_grad_(False)
    state.active = None


def _activate(model: nn.Module, state: PatchState, name: str) -> None:
    """Install adapter ``name`` (the base must be active)."""
    if state.active is not None:  # an internal invariant: never attach twice
        raise PeftspecError(f"internal error: activating {name!r} while {state.active!r} is "
                            "active")
    adapter = state.adapters[name]
    for rec in adapter.records:
        if rec.installed is not rec.original:
            _install(model, rec.step.target, rec.installed)
        rec.method.attach(rec.installed, rec.original, rec.step)
    state.active = name
    _set_trainable(model, state, adapter)
    if adapter.stashed:
        with torch.no_grad():
            for pname, value in adapter.stashed.items():
                state.base_values[pname][0].copy_(value)
        adapter.stashed = None


def _set_trainable(model: nn.Module, state: PatchState, adapter: Adapter,
                   base_params=None) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the adapter's tensors and its trained base
    parameters; return the adapter tensors (repeats allowed), for :func:`verify`.

    ``base_params``: every parameter the model held before the adapter's modules
    went in (``apply_plan`` has them from the plan's compile). Then those are frozen
    in one pass, and only the installed modules are walked (every record's installed
    module and what it holds), not the whole model: on thousands of modules each
    walk counts. A parameter a plugin hangs outside the module it installs is then
    not seen here (:func:`verify` still names one that ``adapter_params()`` does not
    report when the counts disagree). Without ``base_params`` the whole model is
    walked."""
    if base_params is None:
        modules = all_modules(model)
    else:
        deque(map(_freeze, filter(_requires_grad, base_params)), maxlen=0)  # a C loop
        modules = _installed_modules(adapter.records)
    by_class: dict[type, object] = {}  # is_adapter_module, its class lookup once per class
    unfrozen = []
    for module in modules:  # not model.parameters(): its de-duplication costs
        cls = type(module)
        attr = by_class.get(cls, by_class)
        if attr is by_class:
            attr = by_class[cls] = getattr(cls, "adapter_params", None)
        if attr is None:
            attr = module.__dict__.get("adapter_params")
        if callable(attr):
            # an adapter's own tensors are left trainable rather than frozen here and
            # unfrozen again below (two calls each, thousands of times)
            mine = module.adapter_params()
            unfrozen += mine.values()
            for key, p in module._parameters.items():  # (a nested name just refreezes)
                if p is not None and p.requires_grad and mine.get(key) is not p:
                    p.requires_grad_(False)
            continue
        for p in module._parameters.values():  # ~40% more, and freezing twice is harmless
            if p is not None and p.requires_grad:
                p.requires_grad_(False)
    trained = adapter.trained_base_names()
    if trained:
        for name in trained:
            state.base_values[name][0].requires_grad_(True)
    for p in unfrozen:  # after the walk: a later module may share (and freeze) one
        if not p.requires_grad:
            p.requires_grad_(True)
    return unfrozen


def _installed_modules(records: list[Record]) -> list[nn.Module]:
    """Each record's installed module and every module below it, each once."""
    seen: set[int] = set()
    out: list[nn.Module] = []
    for rec in records:
        m = rec.installed
        if id(m) in seen:
            continue
        if not m._modules:  # a leaf (LoRA's and IA3's layers): no walk
            seen.add(id(m))
            out.append(m)
            continue
        for sub in all_modules(m):
            if id(sub) not in seen:
                seen.add(id(sub))
                out.append(sub)
    return out


def use(model: nn.Module, name: str | None) -> nn.Module:
    """Make adapter ``name`` the active one (``None``: the plain base model).

    Only modules are swapped; no frozen base weight is copied.
    """
    state = state_of(model)
    if name is not None and name not in state.adapters:
        raise PeftspecError(f"no adapter named {name!r} on this model; loaded: "
                            f"{', '.join(state.adapters) or 'none'}")
    if name == state.active:
        return model
    _deactivate(model, state)
    if name is not None:
        _activate(model, state, name)
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the plain base model inside the block; the active adapter comes back after.

    Outputs inside are bit-identical to the model without peftspec.
    """
    state = state_of(model)
    previous = state.active
    _deactivate(model, state)
    try:
        yield model
    finally:
        if previous is not None and previous in state.adapters and state.active is None:
            _activate(model, state, previous)


@contextmanager
def using(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Adapter ``name`` active inside the block; the previous one after."""
    previous = active_adapter(model)
    use(model, name)
    try:
        yield model
    finally:
        if is_patched(model) and (previous is None or previous in state_of(model).adapters):
            use(model, previous)


@contextmanager
def base_view(model: nn.Module) -> Iterator[nn.Module]:
    """The base model inside the block (for compiling another plan against it)."""
    if not is_patched(model):
        yield model
        return
    with disabled(model):
        yield model


# --- apply and remove ----------------------------------------------------------------

@gc_paused
def apply_plan(plan: Plan, model: nn.Module, registry=None, *,
               name: str = DEFAULT_NAME, activate: bool | None = None,
               force: bool = False, _tensors=None, _modules=None,
               _freeze_holder=None) -> nn.Module:
    """Execute ``plan`` on ``model`` in place, as adapter ``name``; return the model.

    The first adapter on a model becomes active. A further one is loaded beside
    the active one and stays inactive unless ``activate=True``.

    Raises:
        PeftspecError: an adapter of that name is loaded already, or the model
            is not the one the plan was compiled for.
        AdapterTooLarge: the adapter would add more parameters than the base
            has, or more bytes than the memory available (``force`` skips this
            check, made before anything is allocated).
    """
    if _tensors is None:  # (peftspec.apply checked it a moment ago, training included)
        check_fits(plan, force=force)
    if registry is None:
        from peftspec.core.registry import get_registry

        registry = get_registry()
    state = getattr(model, "_peftspec", None)
    if state is not None and name in state.adapters:
        raise PeftspecError(f"an adapter named {name!r} is already loaded on this model; "
                            "give another name or remove it first")
    previous = state.active if state is not None else None
    if state is not None:
        _deactivate(model, state)
    if _tensors is not None:  # peftspec.apply: compiled from this model a moment ago
        params, buffers = _tensors
    else:
        params, buffers = named_tensors(model)
    if _tensors is None and tensors_digest((params, buffers)) != plan.base_digest:
        if state is not None and previous is not None:
            _activate(model, state, previous)
        raise PeftspecError("this plan was compiled for a different model (tensor names or "
                            "shapes differ); compile it against this model")
    try:  # [[freeze]] first: the adapters are built over the packed base weights
        frozen = freeze_steps(model, plan, registry)
    except BaseException:
        if state is not None and previous is not None:
            _activate(model, state, previous)
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
        state = PatchState(requires_grad=list(zip(base, map(_requires_grad, base))))
    adapter = Adapter(name, plan)
    try:
        parent_of = _parent_finder(model)
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
        prepared: set[str] = set()
        methods: dict[str, Method] = {}  # looked up once per method, not per step
        hooks = _registration_hooks()
        for step in plan.steps:
            if step.family in ("train", "freeze"):
                continue
            method = methods.get(step.method)
            if method is None:
                method = methods[step.method] = registry.method(step.method)
            if step.rule not in prepared and type(method).prepare is not Method.prepare:
                prepared.add(step.rule)  # the rule's modules, before any of them is swapped
                mine = [s for s in plan.steps if s.rule == step.rule]
                method.prepare({s.target: _module_at(model, parent_of, s.target)
                                for s in mine}, mine)
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
            installed = method.apply(original, step)
            adapter.records.append(Record(step, method, original, installed))
            if kept:  # checked now, while both modules are fresh in the cache
                if step.target in done:
                    # a second method on one module: it may have changed the first's
                    # module since that was checked, so verify checks them all after
                    kept = None
                else:
                    done.add(step.target)
                    kept = kept_by_name(original, installed)
            if installed is not original:
                _set_child(parent, child, installed, hooks)
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
        adapter_tensors = _set_trainable(model, state, adapter, params.values())
        after = registry.pm.hook.after_apply
        after(model=model, plan=plan)
        # an after_apply hook may have changed the modules since: then verify looks again
        verify(model, snapshot, adapter_tensors, plan, adapter.records, registry,
               kept=None if after.get_hookimpls() else kept)
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
    if _freeze_holder is not None:  # the caller commits, or undoes if its next step fails
        _freeze_holder.append(frozen)
    else:
        frozen.commit()
    if previous is not None and not activate:
        _deactivate(model, state)
        _activate(model, state, previous)
    return model


def _module_at(model: nn.Module, parent_of, target: str) -> nn.Module:
    path, _, child = target.rpartition(".")
    return getattr(parent_of(path), child) if child else model


def _undo_records(model: nn.Module, records: list[Record]) -> None:
    for rec in reversed(records):
        rec.method.detach(rec.installed, rec.original, rec.step)
        if rec.installed is not rec.original:
            _install(model, rec.step.target, rec.original)


def _finish(model: nn.Module, state: PatchState, activate: str | None) -> None:
    """After an adapter is gone: reactivate one, or restore the plain base."""
    if activate is not None and activate in state.adapters and state.active is None:
        _activate(model, state, activate)
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
            _deactivate(model, state)
        for rec in state.adapters.pop(n).records:
            rec.method.release(rec.installed, rec.original, rec.step)
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
    for rec in reversed(records):
        if rec.method.mergeable:
            merged = rec.method.merge(rec.installed, rec.original)
        else:
            rec.method.detach(rec.installed, rec.original, rec.step)
            merged = rec.original
        if merged is not rec.installed:
            _install(model, rec.step.target, merged)
    for adapter in state.adapters.values():
        for rec in adapter.records:
            rec.method.release(rec.installed, rec.original, rec.step)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    model.__dict__.pop("_peftspec", None)
    return model
