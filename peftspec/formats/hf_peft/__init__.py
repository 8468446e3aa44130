"""HF PEFT's on-disk format, both ways (``peftspec export`` / ``peftspec import``).

HF PEFT saves an adapter as a folder: ``adapter_config.json`` (one config with
one ``peft_type``) and ``adapter_model.safetensors`` (tensors keyed
``base_model.model.<module path>.<name>``; soft prompts as
``prompt_embeddings``). A peftspec adapter is one file whose spec may hold
many rules. This package does what every method shares: reading both formats,
resolving which rule owns which module and tensor, ``[[train]]`` rules <->
``modules_to_save``, the task type, writing readable TOML, the checks, and
atomic writes. What a method's rules *mean* in HF PEFT's terms is the
business of that method's codec (:class:`HFPeftCodec`, :mod:`.codec`),
registered through the ``register_hf_peft_codecs`` hook, so a third-party
method can take part; the built-in codecs are ``peftspec_plugins.hf_peft``.

:class:`ExportContext` and :class:`ImportContext` carry HF PEFT's matching
rules (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``rank_pattern``...) so plugins need not re-implement them. Whatever is
written is checked: an export is re-matched under HF PEFT's rules against the
module names; an import's spec is compiled against the base and every tensor
is checked by name and shape before anything is written. Errors are
:class:`~peftspec.core.errors.ConversionError` (exit code 2) naming the method,
option or tensor. Nothing is ever unpickled.

Modules: :mod:`.codec` (the codec contract and lookup), :mod:`.folder` (file
names, reading a folder), :mod:`.matching` (HF PEFT's target rules), :mod:`.export_context` and :mod:`.exporter`
(peftspec -> HF PEFT), :mod:`.import_context`, :mod:`.importer` and
:mod:`.spec_writer` (HF PEFT -> peftspec). This module re-exports their
public names, so ``from peftspec.formats.hf_peft import ...`` is unchanged.
"""

from __future__ import annotations

from peftspec.formats.hf_peft.codec import HFPeftCodec, codec_for
from peftspec.formats.hf_peft.export_context import ExportContext, ExportRule, HFPeftPart
from peftspec.formats.hf_peft.exporter import export_hf_peft
from peftspec.formats.hf_peft.folder import (CONFIG_FILE, PICKLES, PREFIX, TASK_TYPES, WEIGHTS_FILE,  # noqa: F401
                     read_hf_adapter)
from peftspec.formats.hf_peft.import_context import HFPeftImport, ImportContext, ImportedRule
from peftspec.formats.hf_peft.importer import import_hf_peft
from peftspec.formats.hf_peft.matching import hf_pattern_key, hf_selects
from peftspec.formats.hf_peft.spec_writer import spec_text, toml_value  # noqa: F401

__all__ = ["ExportContext", "ExportRule", "HFPeftCodec", "HFPeftImport", "HFPeftPart", "ImportContext",
           "ImportedRule", "codec_for", "export_hf_peft", "hf_pattern_key", "hf_selects", "import_hf_peft",
           "read_hf_adapter"]
