"""What peftspec reads off any model: the one answer to "how long may its
context be", for training's truncation and soft prompts' room alike."""

from __future__ import annotations

from torch import nn


def context_length(model: nn.Module) -> int | None:
    """The most positions ``model`` takes (its config's ``max_position_embeddings``,
    ``n_positions`` or ``block_size``), or ``None`` where it does not say."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "block_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
