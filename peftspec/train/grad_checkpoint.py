"""Gradient checkpointing: recompute block activations in backward.

With a frozen input embedding, nothing entering the first checkpointed block
requires grad, and reentrant checkpointing then drops the gradient of every
adapter inside ("None of the inputs have requires_grad"). Two things prevent
it here: checkpoints are non-reentrant (``use_reentrant=False``), and a
forward hook on the input embedding marks its output as requiring grad.

* transformers models: their own ``activation_checkpointing_enable`` (called
  ``gradient_checkpointing_enable`` before transformers 5) plus
  ``enable_input_require_grads``;
* other models (the built-in default included): each element of the largest
  ``nn.ModuleList`` (the transformer blocks) runs under
  :func:`torch.utils.checkpoint.checkpoint`. The blocks' ``forward`` is
  wrapped on the instance, so module names and state-dict keys do not change.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftspec.core.errors import PeftspecError


def _require_grad_hook(module, inputs, output):
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)


def block_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of blocks: its non-empty ``ModuleList`` holding the most
    parameters, or ``None`` (what checkpointing and FSDP wrap block by block)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return None
    return max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))


def enable(model: nn.Module) -> str:
    """Turn gradient checkpointing on; returns how (for the log)."""
    if hasattr(model, "gradient_checkpointing_enable") and \
            getattr(model, "supports_gradient_checkpointing", False):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if hasattr(model, "config"):
            model.config.use_cache = False
        return "transformers gradient_checkpointing_enable"
    blocks = block_list(model)
    if blocks is None:
        raise PeftspecError("cannot enable gradient checkpointing: the model has no "
                            "nn.ModuleList of blocks to checkpoint")
    for block in blocks:
        original = block.forward

        @functools.wraps(original)
        def forward(*args, __original=original, **kwargs):
            if not torch.is_grad_enabled():
                return __original(*args, **kwargs)
            return checkpoint(__original, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb) and get_emb() is not None:
        get_emb().register_forward_hook(_require_grad_hook)
    return f"{len(blocks)} blocks checkpointed"
