"""Applying a plan to a model, and undoing it: remove and merge.

``apply_plan`` swaps or augments the planned modules, then freezes every
parameter except the adapter's and the ones ``[[train]]`` selected. Base
tensors stay the same objects with the same bits. What was done is recorded
on the model (``model._peftspec``), so :func:`remove` restores the original
modules and ``requires_grad`` flags exactly, and :func:`merge` folds
reparameterizations into the base weights.

If anything fails half-way, what was applied is rolled back before the error
propagates: the model is never left half-patched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import NotMergeableError, PeftspecError
from .fingerprint import digest, fingerprint, named_tensors
from .method import Method, adapter_params
from .plan import Plan, Step


@dataclass
class Record:
    step: Step
    method: Method
    original: nn.Module
    installed: nn.Module


@dataclass
class PatchState:
    """What peftspec did to a model; kept as ``model._peftspec``."""

    plan: Plan
    records: list[Record] = field(default_factory=list)
    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    # values of the base parameters [[train]] made trainable, as they were at
    # apply: training and loading change them, remove() puts them back
    saved_base: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)

    def trained_base_names(self) -> list[str]:
        return [s.target for s in self.plan.steps if s.family == "train"]


def state_of(model: nn.Module) -> PatchState:
    st = getattr(model, "_peftspec", None)
    if st is None:
        raise PeftspecError("this model has no peftspec adapter (apply a spec first)")
    return st


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_peftspec", None) is not None


def _install(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(plan: Plan, model: nn.Module, registry=None) -> nn.Module:
    """Execute ``plan`` on ``model`` in place and return it.

    Raises:
        PeftspecError: the model is already patched, or is not the model the
            plan was compiled for (its tensor names or shapes differ).
    """
    if registry is None:
        from .plugins import get_registry

        registry = get_registry()
    if is_patched(model):
        raise PeftspecError("this model already has a peftspec adapter applied; "
                            "call peftspec.remove(model) first")
    params, buffers = named_tensors(model)
    if digest(fingerprint(model, tensors=(params, buffers))) != plan.base_digest:
        raise PeftspecError("this plan was compiled for a different model (tensor names or "
                            "shapes differ); compile it against this model")
    state = PatchState(plan, requires_grad=[(p, p.requires_grad) for p in params.values()])
    try:
        parent_name, parent = None, None
        for step in plan.steps:
            if step.family == "train":
                continue
            method = registry.method(step.method)
            # Steps come in model order, so siblings are consecutive: look their
            # parent up once. (No step between them can replace the parent.)
            path, _, child = step.target.rpartition(".")
            if path != parent_name:
                parent_name, parent = path, model.get_submodule(path)
            original = parent.get_submodule(child)
            installed = method.apply(original, step)
            state.records.append(Record(step, method, original, installed))
            if installed is not original:
                setattr(parent, child, installed)
        for p in model.parameters():
            p.requires_grad_(False)
        trained = state.trained_base_names()
        params = dict(model.named_parameters()) if trained else {}
        for name in trained:
            params[name].requires_grad_(True)
            state.saved_base[name] = (params[name], params[name].detach().clone())
        for p in adapter_params(model).values():
            p.requires_grad_(True)
        model.__dict__["_peftspec"] = state
        registry.pm.hook.after_apply(model=model, plan=plan)
    except BaseException:
        model.__dict__["_peftspec"] = state
        _undo(model, state)
        raise
    return model


def _undo(model: nn.Module, state: PatchState) -> None:
    for rec in reversed(state.records):
        rec.method.remove(rec.installed, rec.original)
        if rec.installed is not rec.original:
            _install(model, rec.step.target, rec.original)
    with torch.no_grad():
        for param, value in state.saved_base.values():
            param.copy_(value)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    model.__dict__.pop("_peftspec", None)


def remove(model: nn.Module) -> nn.Module:
    """Take the adapter off: original modules back, ``requires_grad`` as before apply.

    The base weights are the same tensor objects, bit-identical to before,
    including base parameters that ``[[train]]`` trained: their values at
    apply time are restored (use :func:`merge` to keep them).
    """
    _undo(model, state_of(model))
    return model


def _tied_targets(model: nn.Module, state: PatchState) -> list[str]:
    """Mergeable steps whose base tensors are shared with another module (tied)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(path)
    out = []
    for rec in state.records:
        if not rec.method.mergeable:
            continue
        for name, p in rec.original.named_parameters(recurse=False):
            others = [o for o in owners.get(id(p), []) if o != rec.step.target]
            if others:
                out.append(f"{rec.step.method} on '{rec.step.target}' ({rec.step.rule}): its "
                           f"{name} is tied to '{others[0]}'")
    return out


def merge(model: nn.Module, *, skip_unmergeable: bool = False) -> nn.Module:
    """Fold reparameterizations into the base weights; return the plain model.

    This is the one operation that writes base weights. Methods that cannot be
    merged make it fail before anything changes, naming them, unless
    ``skip_unmergeable`` is set: then those are removed instead.
    """
    state = state_of(model)
    tied = _tied_targets(model, state)
    if tied:
        raise NotMergeableError(
            "cannot merge: " + "; ".join(tied) + ". Merging would write the shared tensor "
            "and change the other module too; untie the weights first (e.g. clone the "
            "embedding into the head) or keep this adapter unmerged")
    blocked = [r for r in state.records if not r.method.mergeable]
    if blocked and not skip_unmergeable:
        names = sorted({f"{r.step.method} ({r.step.rule})" for r in blocked})
        raise NotMergeableError("cannot merge: " + ", ".join(names) + " add computation that "
                                "does not fold into base weights (pass skip_unmergeable=True / "
                                "--skip-unmergeable to drop them)")
    for rec in reversed(state.records):
        if rec.method.mergeable:
            merged = rec.method.merge(rec.installed, rec.original)
        else:
            rec.method.remove(rec.installed, rec.original)
            merged = rec.original
        if merged is not rec.installed:
            _install(model, rec.step.target, merged)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    model.__dict__.pop("_peftspec", None)
    return model
