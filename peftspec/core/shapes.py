"""What kind of linear map a module is, and its sizes, for methods that adapt one.

Most methods adapt "a linear map": ``nn.Linear`` (weight stored (out, in)),
transformers' GPT-2 ``Conv1D`` (the same map with its weight stored (in, out)),
and, for some, ``nn.Embedding`` (a lookup of (num, dim)). These helpers tell
them apart without importing transformers (a plugin must load without it), and
read sizes without ``nn.Module.__getattr__``, which is slow when a spec
adapts thousands of modules.
"""

from __future__ import annotations

from torch import nn

KINDS = ("linear", "conv1d", "embedding")


def module_kind(module: nn.Module) -> str | None:
    """``"linear"`` (``nn.Linear``), ``"conv1d"`` (transformers' ``Conv1D``, known by
    its class name, a 2-d ``weight`` and its ``nf``), ``"embedding"``
    (``nn.Embedding``), or ``None`` for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2 and hasattr(module, "nf"):
        return "conv1d"
    return None


def is_linear_map(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    return module_kind(module) in ("linear", "conv1d")


def linear_dims(module: nn.Module, kind: str | None = None) -> tuple[int, int]:
    """``(in, out)`` of ``module``'s linear map; ``(num_embeddings, dim)`` for an
    embedding. ``kind`` is :func:`module_kind`'s answer, when known already."""
    kind = kind or module_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a Linear, Conv1D or Embedding module")
    w = module._parameters["weight"]  # not module.weight: nn.Module.__getattr__ is slow
    if kind == "linear":
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]  # conv1d stores (in, out); embedding (num, dim)
