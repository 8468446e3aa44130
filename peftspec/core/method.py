"""What a plugin author implements: a :class:`Method`, and modules that
expose their new parameters through :class:`AdapterModule`.

A method is a small object with a name, a family, an options dataclass and
the operations its family needs. The compiler resolves a rule's selectors to
targets and asks the method, per target, whether it can handle it
(:meth:`Method.check`) and how many parameters it adds
(:meth:`Method.count_params`). Applying calls :meth:`Method.apply`, which
returns the module to install at the target's path: a new module (a
reparameterization swaps the module) or the same module with adapter children
and hooks attached. Removal and merge undo or fold that.

New trainable parameters are found through :class:`AdapterModule`, never by
matching names: any module in the model whose ``adapter_params()`` returns
parameters contributes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from peftspec.core.capabilities import Mergeable, capabilities_of
from peftspec.core.step import Step


FAMILIES = ("freeze", "train", "reparameterize", "augment", "prefix")


@runtime_checkable
class AdapterModule(Protocol):
    """A module holding adapter parameters (as in torchtune).

    ``adapter_params()`` maps names relative to the module (as they appear in
    its ``state_dict``) to the parameters peftspec adds, trains and saves.

    Optionally, ``param_roles()`` maps some of those names to a role the
    optimizer reads: ``"B"`` (LoRA's second factor, trained at
    ``lr × loraplus_lr_ratio`` under LoRA+) or ``"embedding"`` (LoRA on an
    embedding: ``loraplus_lr_embedding``); see :mod:`peftspec.train.optim`.
    """

    def adapter_params(self) -> dict[str, nn.Parameter]: ...


def is_adapter_module(module: nn.Module) -> bool:
    """Whether ``module`` has a callable ``adapter_params`` (an :class:`AdapterModule`)."""
    # Ask the class first: a miss through nn.Module.__getattr__ is slow, and
    # most modules of a model are not adapters.
    attr = getattr(type(module), "adapter_params", None)
    if attr is None:
        attr = vars(module).get("adapter_params")
    return callable(attr)


def adapter_modules(model: nn.Module):
    """``(prefix, module)`` for every :class:`AdapterModule` in ``model``; ``prefix`` is
    its dotted path with a trailing dot (empty for the model itself)."""
    for name, module in model.named_modules():
        if is_adapter_module(module):
            yield (f"{name}." if name else ""), module


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """All adapter parameters of ``model``, keyed by their full dotted name."""
    return {prefix + key: p for prefix, module in adapter_modules(model)
            for key, p in module.adapter_params().items()}


def _module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    fn = getattr(module, "adapter_state", None)
    return fn() if callable(fn) else dict(module.adapter_params())


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file stores for the adapter modules, by full name.

    A module may define ``adapter_state()`` to store something other than its
    parameters (P-tuning stores its prompt encoder's output, so inference
    needs no encoder) and ``load_adapter_state(tensors)`` to take it back.
    Otherwise its ``adapter_params()`` are stored and copied back.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, module in adapter_modules(model):
        try:
            state = _module_state(module)
        except Exception as exc:  # named by the caller, which knows the plugin
            exc.peftspec_module = prefix[:-1]
            raise
        for key, t in state.items():
            out[prefix + key] = t
    return out


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` (named as :func:`adapter_state` names them) back into the modules."""
    for prefix, module in adapter_modules(model):
        try:
            mine = {key: tensors[prefix + key] for key in _module_state(module)}
            fn = getattr(module, "load_adapter_state", None)
            if callable(fn):
                fn(mine)
                continue
            params = module.adapter_params()
            for key, value in mine.items():
                params[key].copy_(value)
        except Exception as exc:  # named by the caller, which knows the plugin
            exc.peftspec_module = prefix[:-1]
            raise


class TrainingHooks:
    """What a method adds to a training loop; returned by :meth:`Method.training`.

    ``peftspec train`` (and any loop that calls :func:`peftspec.training_hooks`)
    calls, on every hook object of the active adapter's methods:

    * ``extra_loss()`` once per micro-batch, after the forward: a scalar tensor
      added to the model's loss before backward (AdaLoRA's orthogonal
      regularizer), or ``None``. The loop reports it apart from the task loss.
    * ``after_step(step)`` after each optimizer step, before the gradients are
      cleared (they are still readable); ``step`` counts the optimizer steps
      done, 1 after the first (AdaLoRA's importance update and rank allocation).
    * ``resume(step)`` when a run continues from a checkpoint taken after
      ``step`` steps: raise :class:`peftspec.PeftspecError` saying what to do if
      the method's state cannot be recovered from the adapter file.

    The base class does nothing; override what the method needs.
    """

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_step(self, step: int) -> None:
        pass

    def resume(self, step: int) -> None:
        pass


@dataclass(frozen=True)
class NoOptions:
    """For methods without options."""


class Method:
    """Base class of a method plugin. Subclass it and register an instance.

    This is the whole required contract: the class attributes, ``check``,
    ``count_params`` and ``apply``, with ``detach`` / ``attach`` / ``release``
    for a method that attaches anything outside the module it returns. What a
    method may do beyond it (merge, shared state per rule, training hooks,
    initialisation from data, per-row batches) is a protocol of
    :mod:`peftspec.core.capabilities`, declared by implementing its method; HF
    PEFT's format is a codec (:mod:`peftspec.formats.hf_peft.codec`).

    Class attributes:
        name: the spec's ``method = "..."`` value; unique across plugins.
        family: one of ``freeze`` (subclass :class:`FreezeMethod`), ``train``,
            ``reparameterize``, ``augment``, ``prefix`` (:data:`FAMILIES`).
        Options: a frozen dataclass (see :mod:`peftspec.core.options`); unknown
            keys in a rule are errors.
        summary: one line for ``peftspec plugins``.
        unchanged_at_apply: whether the model's outputs are exactly the base's
            right after :meth:`apply` (LoRA's ``B = 0``); the conformance kit
            (:mod:`peftspec.testing`) holds the method to it.
        example: a TOML rule shown by ``peftspec plugins NAME``; by default one
            is generated from ``Options`` (set this where options constrain each
            other, so that the generated one would not load).
    """

    name: ClassVar[str]
    family: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""
    unchanged_at_apply: ClassVar[bool] = False
    example: ClassVar[str] = ""

    def resolve_options(self, options: Any, model: nn.Module) -> Any:
        """Return the options to compile with, given the whole model.

        For options that depend on the architecture, such as a preset that
        expands to selectors. Raise ``ValueError`` with a readable reason when
        the options cannot apply to this model. The default returns
        ``options`` unchanged.
        """
        return options

    def base_note(self, options: Any) -> str | None:
        """A sentence ``peftspec plan`` shows when a rule with these options changes
        the base weights at apply (PiSSA's residual), so that the frozen-base
        promise holds for the changed weights; ``{n}`` and option names are
        filled in. ``None`` (the default): the base stays as it is."""
        return None

    def unchanged_at_apply_with(self, options: Any) -> bool:
        """:attr:`unchanged_at_apply` for a rule with these options (the
        conformance kit asks this; PiSSA's residual rounds)."""
        return self.unchanged_at_apply

    def check(self, module: nn.Module, step: Step) -> str | None:
        """Return why ``module`` cannot take this step, or ``None`` if it can."""
        return None

    def count_params(self, module: nn.Module, step: Step) -> int:
        """How many parameters :meth:`apply` will add to ``module``."""
        return 0

    def apply(self, module: nn.Module, step: Step) -> nn.Module:
        """Patch ``module``; return the module to install at ``step.target``.

        ``module`` is what is installed at the path when the step runs: the
        base module, or another method's module when rules stack on one path
        (reparameterizations are applied before augmentations, so an adapter
        placed after a LoRA-adapted projection receives the LoRA module).

        The frozen-base promise: the base module's parameters and buffers must
        stay the same objects, over the same memory, with the same values (bit
        for bit); the caller freezes them. :func:`peftspec.apply_plan` holds every
        plugin to it: during each ``apply`` of a method that is not peftspec's
        own a :class:`peftspec.core.barrier.WriteBarrier` refuses any in-place
        torch write into a base tensor before it happens; after the last step a
        :class:`peftspec.core.valueguard.ValueGuard` sees one made otherwise
        (version counters; numpy, raw memory: bytes sampled as it leaves torch), and
        :func:`peftspec.core.promise.verify` checks that each base tensor is
        still in the model, the same object over the same memory. A violation
        is a ``PluginError`` naming the distribution, method, rule, spec line
        and tensor, and the modules are rolled back (values written outside
        torch cannot be put back: the message says to reload the model). A
        rule whose options have a :meth:`base_note` (PiSSA) is exempt from the
        value check. New parameters must be reachable through
        :class:`AdapterModule`; buffers on modules ``apply`` builds are adapter
        state (:mod:`peftspec.core.buffers`). Raise ``ValueError`` to refuse the
        input; any other exception is reported as the plugin failing
        (:mod:`peftspec.core.blame`).
        """
        raise NotImplementedError

    def detach(self, installed: nn.Module, original: nn.Module, step: Step) -> None:
        """Undo what :meth:`apply` attached outside ``installed`` (hooks, children
        of ``original``). The caller then puts ``original`` back at the path.
        Called when the adapter is switched off, removed, or merged away.

        ``step`` is the object :meth:`apply` was given; when ``installed is
        original`` (a method that patches in place), it tells which adapter's
        attachment this is, as several adapters may patch the same module."""

    def attach(self, installed: nn.Module, original: nn.Module, step: Step) -> None:
        """Redo what :meth:`detach` undid, when the adapter is switched on again
        (the caller has put ``installed`` back at the path first)."""

    def release(self, installed: nn.Module, original: nn.Module, step: Step) -> None:
        """The adapter is gone for good (removed or merged; already detached):
        drop anything kept for :meth:`attach`."""

    @property
    def mergeable(self) -> bool:
        """Whether :func:`peftspec.merge` can fold this method into base weights: it
        implements ``merge`` (:class:`~peftspec.core.capabilities.Mergeable`), or it
        trains base parameters themselves (``[[train]]``: nothing to fold). A
        subclass may still set ``mergeable = True`` as a class attribute, as
        earlier releases asked; registration refuses it without a ``merge``."""
        return isinstance(self, Mergeable) or self.family == "train"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "summary": self.summary,
                "mergeable": self.mergeable, "unchanged_at_apply": self.unchanged_at_apply,
                "capabilities": capabilities_of(self)}


class FreezeMethod(Method):
    """Base class of a freeze method (``[[freeze]]``): how a frozen weight is stored.

    A freeze method adds no parameters. For each target module that
    :meth:`check` accepts, :meth:`pack` turns its float ``weight`` into a
    :class:`peftspec.core.packed.PackedWeight` (stored tensors plus a
    :class:`~peftspec.core.packed.Codec` that dequantizes them), which replaces the
    parameter; ``F.linear`` then computes through the codec, dequantizing into
    a reused buffer on each call. :meth:`stored_bytes` says what the packed
    weight will occupy, for ``peftspec plan`` (before anything is quantized).
    A freeze is not undone by removing an adapter: no float copy is kept.

    The compiler refuses, naming them, targets whose weight is tied to another
    module or trained by ``[[train]]``; :meth:`check` adds the method's own
    limits (block sizes, module types).
    """

    family = "freeze"
    mergeable = False
    unchanged_at_apply = False

    def stored_bytes(self, module: nn.Module, step: Step) -> int:
        """Bytes of the packed weight :meth:`pack` will make for ``module``."""
        raise NotImplementedError

    def pack(self, weight: torch.Tensor, step: Step) -> torch.Tensor:
        """Return ``weight`` (a detached float tensor) in this method's storage."""
        raise NotImplementedError

    def apply(self, module, step):  # the compiler and apply_plan call pack() instead
        raise NotImplementedError("freeze methods are applied through peftspec.freeze")
