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
point in the ``peftspec`` group; :mod:`peftspec.plugin_api` has everything else
a plugin may use. This package is the facade over every layer
(docs/ARCHITECTURE.md): nothing inside peftspec imports it.
"""

from __future__ import annotations

from peftspec.core.version import __version__  # noqa: E402

from peftspec.core import quiet as _quiet  # noqa: E402

_quiet.install()  # torchao's kernel-loading warnings never reach the terminal

from torch import nn  # noqa: E402

from peftspec.core.errors import (AdapterFileError, ModelSourceError, NotMergeableError,  # noqa: E402
                     OptionError, PeftspecError, PluginError, PluginInputError, Problem,
                     SpecError)
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
from peftspec.core.facade import apply, load_model, trainable_parameters  # noqa: E402
from peftspec.train.hooks import training_hooks as hooks
from peftspec.train.hooks import init_from_data as init


def training_hooks(model: nn.Module, total_steps: int) -> list:
    """The active adapter's :class:`peftspec.core.method.TrainingHooks` (AdaLoRA's rank
    allocation and regularizer), for a hand-written loop: see
    :mod:`peftspec.train.hooks`. ``peftspec train`` calls them itself."""

    return hooks(model, total_steps)


def init_from_data(model: nn.Module, batches, report=None) -> None:
    """Initialise the active adapter's data-driven parts from ``batches`` before
    training: LoRA's ``init = "eva"`` (``batches``: dicts with ``input_ids`` and
    optionally ``attention_mask`` / ``labels``; ``report``: a callable given
    progress lines). ``peftspec train`` calls it itself. EVA may change ranks
    and so rebuild the adapter: build the optimizer after this call."""

    init(model, batches, report)


__all__ = [
    "__version__", "active_adapter", "adapter_names", "disabled", "rows", "use", "using",
    "AdapterFileError", "AdapterModule", "AdapterTooLarge", "Method", "ModelSourceError",
    "NotMergeableError", "OptionError", "PeftspecError", "Plan", "PluginError",
    "PluginInputError", "Problem", "Rule", "Spec",
    "SpecError", "Step", "adapter_params", "apply", "apply_plan", "build_registry",
    "compile_plan", "export_hf_peft", "get_registry", "hookimpl", "import_hf_peft",
    "export_gguf", "is_patched", "load_adapter", "load_model",
    "load_spec", "merge", "option", "parse_spec", "remove", "save_adapter", "selectors",
    "trainable_parameters", "training_hooks", "TrainingHooks", "init_from_data",
    "CombineError", "combine",
]
