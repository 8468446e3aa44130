"""When ``peftspec train`` builds the model without transformers (a faster start).

Importing transformers costs ~2.4 s of a warm 4.2 s start on SmolLM2 (issue 10).
For the sources whose folder peftspec writes itself (``smollm2``, ``gguf:PATH``:
the GGUF file's cache entry), training can instead use
:mod:`peftspec.models.native_llama` (transformers' names, the same logits bit for
bit) and :class:`peftspec.models.native_tokenizer.NativeTokenizer` (the same ids).
It is used only where it covers everything the run needs:

* the cache entry is a Llama config the native model covers;
* the spec adapts modules only (no soft prompt or prefix: those go through
  transformers' ``inputs_embeds`` and key/value cache);
* one process (torchrun runs take transformers' model, whose layers FSDP and DDP
  are tested with);
* a causal-LM task (a classifier needs transformers' head);
* ``PEFTSPEC_NATIVE`` is not ``0`` (the switch back, for comparing the two).

Everything else (generation, merging, export) loads transformers' model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from peftspec.models.hf import hf_folder
from peftspec.models.native_llama import load, supported

# The spec families whose methods patch modules: the native model has the same ones.
MODULE_FAMILIES = frozenset({"reparameterize", "augment", "train", "freeze"})


def why_not(source: str | None, spec, world_size: int = 1, classify: bool = False) -> str | None:
    """Why this run takes transformers' model (``None``: it may use the native one),
    before anything is loaded."""
    if os.environ.get("PEFTSPEC_NATIVE", "1") == "0":
        return "PEFTSPEC_NATIVE=0"
    if source != "smollm2" and not ((source or "").startswith("gguf:") and source[5:]):
        return "not a smollm2 or gguf:PATH source"
    if classify:
        return "a classification task"
    if world_size != 1:
        return "a distributed run"
    families = {r.family for r in spec.rules}
    if not families <= MODULE_FAMILIES:
        return f"the spec has {', '.join(sorted(families - MODULE_FAMILIES))} rules"
    return None


def load_for_training(source: str) -> nn.Module | None:
    """The native model of ``source``'s cache folder, or ``None`` when its config is
    not covered or it has no ``tokenizer.json`` (the caller then loads
    transformers')."""

    folder = hf_folder(source)  # the cache entry, converted and verified
    if folder is None:
        return None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("architectures") not in (None, ["LlamaForCausalLM"]) or supported(config):
        return None
    if not (folder / "tokenizer.json").is_file():  # NativeTokenizer reads only that
        return None
    model = load(folder, config)
    model.__dict__["_peftspec_folder"] = folder  # for the tokenizer (a plain attribute)
    return model


def folder_of_model(model: nn.Module) -> Path | None:
    """The cache folder a native model was loaded from, else ``None``."""
    return model.__dict__.get("_peftspec_folder")
