"""The adapters on a model and switching between them.

A model may carry several named adapters over one base (``model._peftspec``
holds a :class:`PatchState`). At most one is *active*: its modules are
installed and its ``[[train]]`` values sit in the base tensors they train.
Switching (:func:`use`, :func:`disabled`, :func:`base_view`) uninstalls one
adapter's modules and installs another's; no frozen base weight is copied.
Applying, removing and merging are :mod:`peftspec.core.patching`'s.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter, methodcaller
from typing import Any, Iterator

import torch
from torch import nn

from peftspec.core.blame import reraise
from peftspec.core.errors import PeftspecError
from peftspec.core.fastmodule import all_modules
from peftspec.core.method import Method
from peftspec.core.step import Step

DEFAULT_NAME = "default"

requires_grad_of = attrgetter("requires_grad")
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
    plan: Any  # a peftspec.core.plan.Plan (not imported: the plan module imports this one)
    records: list[Record] = field(default_factory=list)
    # values of the base parameters its [[train]] rules train, kept here while
    # another adapter (or the base) is active
    stashed: dict[str, torch.Tensor] | None = None
    # the registry it was applied with: who provides each method, for errors
    registry: Any = None

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
    # names of the base's buffers (any other buffer is an adapter's: core.buffers)
    base_buffer_names: Any = ()

    @property
    def current(self) -> Adapter:
        if self.active is None:
            raise PeftspecError("no adapter is active (the base model is); "
                                "call peftspec.use(model, name) first")
        return self.adapters[self.active]

    # the active adapter's plan and records (what save and merge act on)
    @property
    def plan(self) -> Any:
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


def install(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` in ``model`` (which has a child there already)."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    set_child(parent, child, module)


def set_child(parent: nn.Module, name: str, module: nn.Module,
               hooks: bool | None = None) -> None:
    """``setattr(parent, name, module)`` for an existing child ``name``.

    Where that would only store it in ``parent._modules`` (a plain ``nn.Module``
    ``__setattr__``, no global module-registration hooks), it stores it there
    directly: ``nn.Module.__setattr__`` costs microseconds, thousands of times.
    ``hooks``: :func:`registration_hooks`, where the caller asked it once for many."""
    if hooks is None:
        hooks = registration_hooks()
    if (type(parent).__setattr__ is nn.Module.__setattr__ and name in parent._modules
            and not hooks):
        parent._modules[name] = module
    else:
        setattr(parent, name, module)


def registration_hooks() -> bool:
    """Whether torch has global module-registration hooks installed (then children are
    set through ``setattr``, never straight into ``_modules``)."""
    hooks = getattr(nn.modules.module, "_global_module_registration_hooks", None)
    return hooks is None or bool(hooks)  # unknown torch: take the safe, slow path


def parent_finder(model: nn.Module):
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

def uninstall_active(model: nn.Module, state: PatchState) -> None:
    """Uninstall the active adapter: original modules back, base values back."""
    if state.active is None:
        return
    adapter = state.adapters[state.active]
    for rec in reversed(adapter.records):
        try:
            rec.method.detach(rec.installed, rec.original, rec.step)
        except Exception as exc:  # noqa: BLE001 - named (core.blame)
            reraise(exc, adapter.registry, rec.step, "detach", adapter.plan.spec.file,
                    target=rec.step.target)
        if rec.installed is not rec.original:
            install(model, rec.step.target, rec.original)
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


def install_adapter(model: nn.Module, state: PatchState, name: str) -> None:
    """Install adapter ``name`` (the base must be active)."""
    if state.active is not None:  # an internal invariant: never attach twice
        raise PeftspecError(f"internal error: activating {name!r} while {state.active!r} is "
                            "active")
    adapter = state.adapters[name]
    for rec in adapter.records:
        if rec.installed is not rec.original:
            install(model, rec.step.target, rec.installed)
        try:
            rec.method.attach(rec.installed, rec.original, rec.step)
        except Exception as exc:  # noqa: BLE001
            reraise(exc, adapter.registry, rec.step, "attach", adapter.plan.spec.file,
                    target=rec.step.target)
    state.active = name
    set_trainable(model, state, adapter)
    if adapter.stashed:
        with torch.no_grad():
            for pname, value in adapter.stashed.items():
                state.base_values[pname][0].copy_(value)
        adapter.stashed = None


def set_trainable(model: nn.Module, state: PatchState, adapter: Adapter,
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
        deque(map(_freeze, filter(requires_grad_of, base_params)), maxlen=0)  # a C loop
        modules = installed_modules(adapter.records)
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


def installed_modules(records: list[Record]) -> list[nn.Module]:
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
    uninstall_active(model, state)
    if name is not None:
        install_adapter(model, state, name)
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the plain base model inside the block; the active adapter comes back after.

    Outputs inside are bit-identical to the model without peftspec.
    """
    state = state_of(model)
    previous = state.active
    uninstall_active(model, state)
    try:
        yield model
    finally:
        if previous is not None and previous in state.adapters and state.active is None:
            install_adapter(model, state, previous)


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
