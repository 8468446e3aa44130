"""The one-call conveniences of the package root: :func:`apply` (load, compile,
check and apply a spec), :func:`load_model` and :func:`trainable_parameters`.

They live here, in the core, so that modules inside peftspec can call them
without importing the package root (which imports every layer).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from peftspec.core.patching import apply_plan, is_patched
from peftspec.core.plan import ModelIndex, compile_with_tensors
from peftspec.core.registry import registry_or_default
from peftspec.core.sizeguard import check_fits
from peftspec.core.spec import Spec, load_spec


def apply(spec: Spec | str | Path, model: nn.Module, registry=None, *, force: bool = False,
          training: bool = False) -> nn.Module:
    """Load (if a path), compile and apply ``spec`` to ``model`` in place.

    An adapter larger than the base or than the memory available is refused
    (:class:`peftspec.core.sizeguard.AdapterTooLarge`) unless ``force``; ``training``
    counts its gradients and AdamW states in that check too."""
    if not isinstance(spec, Spec):
        spec = load_spec(spec, registry=registry)
    fresh = not is_patched(model)
    plan, tensors, modules = compile_with_tensors(spec, model, registry=registry)
    check_fits(plan, force=force, training=training)
    # Compiled this instant from this very model: apply_plan need not walk it again
    # to check that the plan fits, nor to find the targets (a patched model's active
    # adapter moves, so it does).
    if not fresh:
        return apply_plan(plan, model, registry=registry, force=force)
    return apply_plan(plan, model, registry=registry, force=force,
                      index=ModelIndex(tensors, modules))


def load_model(source: str | None = None, registry=None, *,
               num_labels: int | None = None) -> nn.Module:
    """Build the model a ``--model`` string names (``None``: the built-in default).

    ``num_labels``: its sequence classification variant, with a new head of
    that many classes (drawn from torch's global generator)."""
    return registry_or_default(registry).load_model(source, num_labels=num_labels)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters left trainable (what to hand an optimizer)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
