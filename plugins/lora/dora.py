"""DoRA (weight-decomposed LoRA): a magnitude per output row rescales the adapted
weight, ``W' = m · (W + s·B·A) / ||W + s·B·A||``, the norm detached from the
graph as the DoRA paper recommends and HF PEFT computes it.

The norm is a constant while the factors do not change: outside training
(the module in eval mode, or gradients off) it is computed once and kept
until ``W``, ``A`` or ``B`` changes (:func:`weight_norm`). Computing it costs
a full ``(out, in)`` product ``B·A`` and a pass over ``W`` (dequantizing a
``[[freeze]]``-packed ``W``), which at one token a step costs several times
the layer's own matmul."""

from __future__ import annotations

import torch

from .kept import autocast_context, forget, kept


def initial_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """``m`` at init: the row norms of the (out, in) ``weight``, in its own dtype,
    exactly as :func:`adapted_output` computes them, so that ``m / ||W||`` is exactly
    1 and outputs are unchanged bit for bit."""
    return (weight + torch.zeros_like(weight)).norm(p=2, dim=1).detach()


def _norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
          scale: float) -> torch.Tensor:
    return (weight + scale * (lora_b @ lora_a)).norm(p=2, dim=1).detach()


def weight_norm(layer) -> torch.Tensor:
    """``||W + s·B·A||`` per output row of the LoRA ``layer``, detached.

    Training (``layer.training`` with gradients on): computed afresh each call.
    Otherwise kept (:func:`.kept.kept`) while ``W``, ``A`` and ``B`` hold the
    same values, under the same scale and autocast."""
    p = layer._parameters
    a, b = p["lora_A"], p["lora_B"]

    def compute():
        return _norm(layer._weight_out_in(), a, b, layer.scale)

    if layer.training and torch.is_grad_enabled():
        return compute()
    return kept(layer, "norm", (p["weight"], a, b), (layer.scale, autocast_context(p["weight"])),
                compute)


def adapted_output(norm: torch.Tensor, scale: float, magnitude: torch.Tensor,
                   bias: torch.Tensor | None, out: torch.Tensor,
                   lora: torch.Tensor) -> torch.Tensor:
    """The DoRA output, given :func:`weight_norm`, the base output ``out`` and
    LoRA's unscaled update ``lora = (x·Aᵀ)·Bᵀ``: the base output rescaled by
    ``m/||W + s·B·A||``."""
    mag = magnitude / norm
    base = out if bias is None else out - bias
    return out + (mag - 1) * base + mag * lora * scale


def merged(new: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The folded (out, in) weight in float32, given ``new = W + s·B·A`` in float32."""
    return new * (magnitude.float() / new.norm(p=2, dim=1)).unsqueeze(1)


__all__ = ["adapted_output", "forget", "initial_magnitude", "merged", "weight_norm"]
