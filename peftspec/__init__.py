"""peftspec: declarative, pluggable parameter-efficient fine-tuning for PyTorch.

Write a TOML spec, compile it against a model, apply it::

    import peftspec
    spec = peftspec.load_spec("specs/lora.toml")
    plan = peftspec.compile_plan(spec, model)   # validates; changes nothing
    peftspec.apply_plan(plan, model)            # patches in place, freezes the base
    ...train...
    peftspec.save_adapter(model, "lora.safetensors")
    peftspec.remove(model)                      # original modules back, bit-identical

Plugin authors: subclass :class:`Method`, register it from a
``register_methods`` hook marked with :data:`hookimpl`, and declare an entry
point in the ``peftspec`` group.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path  # noqa: E402

from peftspec.core import quiet as _quiet  # noqa: E402

_quiet.install()  # torchao's kernel-loading warnings never reach the terminal

from torch import nn  # noqa: E402

from peftspec.core.errors import (AdapterFileError, ModelSourceError, NotMergeableError,  # noqa: E402
                     PeftspecError, PluginError, Problem, SpecError)
from peftspec.core.hookspecs import hookimpl  # noqa: E402
from peftspec.core.method import AdapterModule, Method, TrainingHooks, adapter_params  # noqa: E402
from peftspec.core.options import option, selectors  # noqa: E402
from peftspec.core.patching import (active_adapter, adapter_names, apply_plan, disabled,  # noqa: E402
                       is_patched, merge, remove, use, using)
from peftspec.core.plan import Plan, Step, compile_plan, compile_with_tensors  # noqa: E402
from peftspec.core.rows import rows  # noqa: E402
from peftspec.core.sizeguard import AdapterTooLarge, check_fits  # noqa: E402
from peftspec.core.registry import build_registry, get_registry  # noqa: E402
from peftspec.core.spec import Rule, Spec, load_spec, parse_spec  # noqa: E402
from peftspec.formats.adapter_file import load_adapter, save_adapter  # noqa: E402
from peftspec.formats.hf_peft import export_hf_peft, import_hf_peft  # noqa: E402
from peftspec.formats.gguf_export import export_gguf  # noqa: E402
from peftspec.merging.combine import CombineError, combine  # noqa: E402


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
    return apply_plan(plan, model, registry=registry, force=force, _tensors=tensors,
                      _modules=modules)


def load_model(source: str | None = None, registry=None, *,
               num_labels: int | None = None) -> nn.Module:
    """Build the model a ``--model`` string names (``None``: the built-in default).

    ``num_labels``: its sequence classification variant, with a new head of
    that many classes (drawn from torch's global generator)."""
    return (registry or get_registry()).load_model(source, num_labels=num_labels)


def training_hooks(model: nn.Module, total_steps: int) -> list:
    """The active adapter's :class:`peftspec.core.method.TrainingHooks` (AdaLoRA's rank
    allocation and regularizer), for a hand-written loop: see
    :mod:`peftspec.train.hooks`. ``peftspec train`` calls them itself."""
    from peftspec.train.hooks import training_hooks as hooks

    return hooks(model, total_steps)


def init_from_data(model: nn.Module, batches, report=None) -> None:
    """Initialise the active adapter's data-driven parts from ``batches`` before
    training: LoRA's ``init = "eva"`` (``batches``: dicts with ``input_ids`` and
    optionally ``attention_mask`` / ``labels``; ``report``: a callable given
    progress lines). ``peftspec train`` calls it itself. EVA may change ranks
    and so rebuild the adapter: build the optimizer after this call."""
    from peftspec.train.hooks import init_from_data as init

    init(model, batches, report)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters left trainable (what to hand an optimizer)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


__all__ = [
    "__version__", "active_adapter", "adapter_names", "disabled", "rows", "use", "using",
    "AdapterFileError", "AdapterModule", "AdapterTooLarge", "Method", "ModelSourceError",
    "NotMergeableError", "PeftspecError", "Plan", "PluginError", "Problem", "Rule", "Spec",
    "SpecError", "Step", "adapter_params", "apply", "apply_plan", "build_registry",
    "compile_plan", "export_hf_peft", "get_registry", "hookimpl", "import_hf_peft",
    "export_gguf", "is_patched", "load_adapter", "load_model",
    "load_spec", "merge", "option", "parse_spec", "remove", "save_adapter", "selectors",
    "trainable_parameters", "training_hooks", "TrainingHooks", "init_from_data",
    "CombineError", "combine",
]
