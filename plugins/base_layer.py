"""The wrapped base layer's output, shared by the methods that wrap ``nn.Linear``
and transformers' ``Conv1D`` in one module of their own (LoRA, AdaLoRA, VeRA,
IA3): each keeps ``kind``, ``weight``, ``bias`` and, for Conv1D, ``nf``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def base_output(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s base output for ``x``; use as a method: ``_base = base_output``."""
    if layer.kind == "conv1d":  # as transformers' Conv1D.forward, bit for bit
        size_out = x.size()[:-1] + (layer.nf,)
        return torch.addmm(layer.bias, x.view(-1, x.size(-1)), layer.weight).view(size_out)
    return F.linear(x, layer.weight, layer.bias)
