"""DoRA (weight-decomposed LoRA): a magnitude per output row rescales the adapted
weight, ``W' = m · (W + s·B·A) / ||W + s·B·A||``, the norm detached from the
graph as the DoRA paper recommends and HF PEFT computes it."""

from __future__ import annotations

import torch


def initial_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """``m`` at init: the row norms of the (out, in) ``weight``, in its own dtype,
    exactly as :func:`adapted_output` computes them, so that ``m / ||W||`` is exactly
    1 and outputs are unchanged bit for bit."""
    return (weight + torch.zeros_like(weight)).norm(p=2, dim=1).detach()


def adapted_output(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scale: float, magnitude: torch.Tensor, bias: torch.Tensor | None,
                   out: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """The DoRA output, given the base output ``out`` and LoRA's unscaled update
    ``lora = (x·Aᵀ)·Bᵀ``: the base output rescaled by ``m/||W + s·B·A||``."""
    norm = (weight + scale * (lora_b @ lora_a)).norm(p=2, dim=1).detach()
    mag = magnitude / norm
    base = out if bias is None else out - bias
    return out + (mag - 1) * base + mag * lora * scale


def merged(new: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The folded (out, in) weight in float32, given ``new = W + s·B·A`` in float32."""
    return new * (magnitude.float() / new.norm(p=2, dim=1)).unsqueeze(1)
