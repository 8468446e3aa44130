"""What a soft prompt needs from a model, behind one small interface.

A soft prompt needs three things of the model it prompts: its input embedding,
the geometry of its key/value cache (prefix tuning: layers, key/value heads,
head width) and, for ``init = { text = ... }``, a tokenizer. How to read them
differs by model family; a :class:`ModelView` answers for one family, and
:func:`view_for` picks the first view in :data:`VIEWS` that accepts the model.
Supporting another family is one more view, not a special case in the methods.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from peftspec.plugin_api import GPT

CHILD = "prompt"  # the attribute a soft prompt is attached as, on the model itself


class ModelView:
    """How one family of models exposes what a soft prompt needs (the default:
    transformers' conventions)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        return True

    def kv_geometry(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim), from a transformers config."""
        cfg = getattr(self.model, "config", None)
        if cfg is None:
            raise ValueError("prefix tuning needs a model with a config (transformers, or "
                             "peftspec's default model)")
        layers = getattr(cfg, "num_hidden_layers", None)
        heads = getattr(cfg, "num_attention_heads", None)
        if layers is None or heads is None:
            raise ValueError(f"cannot read layers and heads from {type(cfg).__name__}")
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return layers, kv_heads, head_dim

    def tokenizer(self) -> Callable[[str], list[int]] | None:
        """Text -> token ids, from the tokenizer saved beside the model's weights
        (``config._name_or_path``), or ``None`` when there is none."""
        cfg = getattr(self.model, "config", None)
        path = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
        if not path:
            return None
        try:
            from transformers import AutoTokenizer  # optional: only transformers models get here

            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # noqa: BLE001 - no tokenizer there
            return None
        return lambda text: tok(text, add_special_tokens=False)["input_ids"]


class NanoGPTView(ModelView):
    """peftspec's built-in nanoGPT (the default model, and its classifier): a GPT-2
    config without transformers' names, and UTF-8 bytes for tokens."""

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        if isinstance(model, GPT):
            return True
        cfg = getattr(model, "config", None)
        return all(hasattr(cfg, k) for k in ("n_layer", "n_head", "n_embd")) and \
            not hasattr(cfg, "num_hidden_layers")

    def kv_geometry(self) -> tuple[int, int, int]:
        cfg = self.model.config
        return cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head

    def tokenizer(self) -> Callable[[str], list[int]] | None:
        if isinstance(self.model, GPT):
            return lambda text: list(text.encode("utf-8"))
        return super().tokenizer()


VIEWS: list[type[ModelView]] = [NanoGPTView, ModelView]  # the first that accepts wins


def view_for(model: nn.Module) -> ModelView:
    """The :class:`ModelView` of ``model``."""
    return next(v for v in VIEWS if v.accepts(model))(model)


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) for prefix tuning."""
    return view_for(model).kv_geometry()


def find_embedding(model: nn.Module, path: str | None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the model's input embedding: ``path`` when given, else
    ``get_input_embeddings()``. Raises ``ValueError`` saying what to set."""
    if path:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"embedding '{path}' is not a module of this model") from None
    else:
        getter = getattr(model, "get_input_embeddings", None)
        module = getter() if callable(getter) else None
        if module is None:
            raise ValueError("cannot find the model's input embedding: it has no "
                             "get_input_embeddings(); name it with embedding = '...'")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"the input embedding ({type(module).__name__}) has no 2-D weight")
    name = next((n for n, m in model.named_modules() if m is module), path or "?")
    return name, module
