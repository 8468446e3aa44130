"""What a method may do beyond the required contract, declared as protocols.

The required part of a method is :class:`peftspec.core.method.Method`: a name, a
family, options, ``check``, ``count_params`` and ``apply`` (with ``detach`` /
``attach`` / ``release`` when it patches in place). Everything else is optional,
and a method declares it by implementing the protocol's method, nothing more:
peftspec asks ``isinstance(method, Mergeable)``, never probes attributes.

========================= ====================================================
protocol                   what implementing it means
========================= ====================================================
:class:`Mergeable`         ``merge`` folds the method into base weights
:class:`SharesRuleState`   ``prepare`` makes state a rule's modules share (VeRA)
:class:`Trains`            ``training`` adds to the training loop (AdaLoRA)
:class:`InitFromData`      ``init_from_data`` initialises from data (LoRA's EVA)
:class:`PerRow`            ``rows_attach``: an in-place method (soft prompts)
                           takes part in per-row batches (``peftspec.rows``)
========================= ====================================================

HF PEFT's format is not a method capability: a codec per method converts it,
registered through the ``register_hf_peft_codecs`` hook
(:mod:`peftspec.formats.hf_peft.codec`).

The protocols are ``runtime_checkable``: ``isinstance`` checks that the method
exists, not its signature; the signatures below are the contract.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn

from peftspec.core.step import Step


@runtime_checkable
class Mergeable(Protocol):
    """A method whose adapter folds into the base weights (``peftspec merge``)."""

    def merge(self, installed: nn.Module, original: nn.Module) -> nn.Module:
        """Fold the adapter into ``original``'s weights (float32 math, one cast);
        return the plain module."""


@runtime_checkable
class SharesRuleState(Protocol):
    """A method whose modules of one rule share state that depends on all of them."""

    def prepare(self, modules: dict[str, nn.Module], steps: list[Step]) -> None:
        """Called once per rule, just before the rule's first ``apply``, with all
        of the rule's ``steps`` and the ``modules`` now at their targets (by path,
        plan order).

        VeRA's random projections, sized to the rule's largest module and drawn
        once. Keep the state on the method keyed by ``id(step)`` (the very objects
        ``apply`` then receives) and take it from there in ``apply``. Such an
        adapter is merged with the whole model in memory (``peftspec merge`` does
        not stream it module by module, where a module would be adapted without
        its rule's others)."""


@runtime_checkable
class Trains(Protocol):
    """A method that does something during training beyond its forward."""

    def training(self, model: nn.Module, steps: list[Step], total_steps: int) -> Any:
        """Return a :class:`peftspec.core.method.TrainingHooks` (or ``None``).

        ``model`` carries the applied adapter; ``steps`` are this method's steps
        of it (``model.get_submodule(step.target)`` is the installed module);
        ``total_steps`` is the run's number of optimizer steps. Raise
        ``ValueError`` with a readable reason when the options do not fit the run
        (AdaLoRA's schedule longer than the run)."""


@runtime_checkable
class InitFromData(Protocol):
    """A method that initialises its parameters from data before training."""

    def init_from_data(self, model: nn.Module, steps: list[Step], batches: Any,
                       report: Any) -> None:
        """Called by :func:`peftspec.init_from_data` (``peftspec train`` calls it
        before the first step) with this method's steps of the active adapter,
        ``batches`` (dicts of ``input_ids``, ``attention_mask``, ``labels``, or
        ``input_ids`` tensors; iterable more than once) and ``report(message)``
        for progress lines. It must not write base weights; it may re-apply the
        adapter (as EVA does when it changes ranks). Raise ``ValueError`` with a
        readable reason when the data cannot serve."""


@runtime_checkable
class PerRow(Protocol):
    """An in-place method (it patches the whole model, as soft prompts do) that can
    take part in a per-row forward. Module-replacing methods need nothing: peftspec
    dispatches rows between their modules itself."""

    def rows_attach(self, model: nn.Module, steps: dict[str, Step], names: list) -> Any:
        """Take part in a forward where row ``i`` uses adapter ``names[i]``
        (``steps`` maps each participating adapter to its step). Return an object
        with ``remove()``."""


CAPABILITIES = {"mergeable": Mergeable, "shares_rule_state": SharesRuleState,
                "trains": Trains, "init_from_data": InitFromData, "per_row": PerRow}


def capabilities_of(method: object) -> list[str]:
    """The names (keys of :data:`CAPABILITIES`) of the protocols ``method`` implements."""
    return [name for name, proto in CAPABILITIES.items() if isinstance(method, proto)]
