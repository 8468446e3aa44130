"""The public API for method plugins: everything a plugin imports from peftspec.

The built-in plugins (``plugins/``, installed as ``peftspec_plugins``) import
from here and from the package root only, exactly as a third party's plugin
does; import-linter holds them to it (``pyproject.toml``). Nothing here is
private, and every name is documented where it is defined.

The basics (also at the package root, ``from peftspec import ...``):
    :data:`hookimpl`, :class:`Method`, :func:`option`, :func:`selectors`,
    :class:`Problem` and the errors.
A method's contract:
    :class:`Method`, :class:`FreezeMethod`, :class:`TrainingHooks`,
    :class:`AdapterModule` (new parameters are found through it), :class:`Step`
    (what ``check``/``apply`` receive).
Optional capabilities, declared by implementing them (see
:mod:`peftspec.core.capabilities`): :class:`Mergeable`, :class:`SharesRuleState`,
    :class:`Trains`, :class:`InitFromData`, :class:`PerRow`.
HF PEFT's format, a codec per method (the ``register_hf_peft_codecs`` hook):
    :class:`HFPeftCodec`, with what it receives and returns,
    :class:`ExportRule`, :class:`ExportContext`, :class:`HFPeftPart`,
    :class:`ImportContext`, :class:`ImportedRule`, :class:`HFPeftImport`.
Fast module construction (thousands of targets on a deep model):
    :func:`init_module`, :func:`parameter` (see :mod:`peftspec.core.fastmodule`).
What a target module is: :func:`module_kind`, :func:`linear_dims`,
    :func:`is_linear_map` (Linear, GPT-2's Conv1D, Embedding; see
    :mod:`peftspec.core.shapes`).
Frozen-base storage, for freeze methods and for methods that read a packed
weight: :class:`PackedWeight`, :class:`Codec`, :func:`dequantized`,
    :func:`install_weight`, :func:`is_packed`, :func:`codec_scratch`.
Re-applying a spec from inside a method (EVA changes ranks):
    :func:`parse_spec`, :func:`compile_plan`, :func:`apply_plan`,
    :func:`remove`, :func:`state_of`, :func:`toml_value`, :func:`toml_loads`,
    :func:`parse_selector`.
What a model is: :func:`context_length` (the one answer peftspec uses).
Model sources (the ``register_model_sources`` hook):
    the built-in nanoGPT (:class:`GPT`, :class:`GPTConfig`,
    :class:`GPTForSequenceClassification`), transformers folders
    (:func:`config_and_class`, :class:`HFTokenizer`), GGUF files
    (:func:`open_folder`, :func:`smollm2_file`), and :func:`quiet_torchao`.
"""

from __future__ import annotations

from peftspec.core.errors import (AdapterFileError, ModelSourceError, NotMergeableError,
                                  OptionError, PeftspecError, PluginError, PluginInputError,
                                  Problem, SpecError)
from peftspec.core.fastmodule import init_module, parameter
from peftspec.core.hookspecs import hookimpl
from peftspec.core.matching import parse_selector
from peftspec.core.modelinfo import context_length
from peftspec.core.method import (AdapterModule, FreezeMethod, Method, NoOptions,
                                  TrainingHooks, adapter_params)
from peftspec.core.options import option, selectors
from peftspec.core.packed import (Codec, PackedWeight, codec_scratch, dequantized, install_weight,
                                  is_packed)
from peftspec.core.patching import apply_plan, remove
from peftspec.core.plan import compile_plan
from peftspec.core.quiet import quiet_torchao
from peftspec.core.shapes import is_linear_map, linear_dims, module_kind
from peftspec.core.spec import parse_spec
from peftspec.core.state import state_of
from peftspec.core.step import Step
from peftspec.core.untrusted import toml_loads
from peftspec.core.capabilities import InitFromData, Mergeable, PerRow, SharesRuleState, Trains
from peftspec.formats.hf_peft import (ExportContext, ExportRule, HFPeftCodec, HFPeftImport,
                                      HFPeftPart, ImportContext, ImportedRule)
from peftspec.formats.hf_peft.spec_writer import toml_value
from peftspec.models.gguf import open_folder, smollm2_file
from peftspec.models.hf import config_and_class
from peftspec.models.nanogpt import GPT, GPTConfig, GPTForSequenceClassification
from peftspec.models.tokenizer import HFTokenizer

__all__ = [
    "AdapterFileError", "AdapterModule", "Codec", "ExportContext", "ExportRule", "FreezeMethod",
    "GPT", "GPTConfig", "HFPeftCodec", "HFPeftImport", "HFPeftPart", "ImportContext",
    "ImportedRule", "InitFromData", "Mergeable", "PerRow", "SharesRuleState", "Trains",
    "GPTForSequenceClassification", "HFTokenizer", "Method", "ModelSourceError", "NoOptions",
    "NotMergeableError", "PackedWeight", "OptionError", "PeftspecError", "PluginError",
    "PluginInputError", "Problem", "SpecError",
    "Step", "TrainingHooks", "adapter_params", "apply_plan", "compile_plan", "config_and_class",
    "codec_scratch", "context_length",
    "dequantized", "hookimpl", "init_module", "install_weight", "is_linear_map", "is_packed",
    "linear_dims", "module_kind", "open_folder",
    "option", "parameter", "parse_selector", "parse_spec", "quiet_torchao", "remove",
    "selectors", "smollm2_file", "state_of", "toml_loads", "toml_value",
]
