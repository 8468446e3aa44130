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

import weakref

import torch

# layer -> (tensor refs, their versions, scale, context, norm); held beside the
# layer, not on it, so that copying, pickling and state dicts never see it
_NORMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def initial_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """``m`` at init: the row norms of the (out, in) ``weight``, in its own dtype,
    exactly as :func:`adapted_output` computes them, so that ``m / ||W||`` is exactly
    1 and outputs are unchanged bit for bit."""
    return (weight + torch.zeros_like(weight)).norm(p=2, dim=1).detach()


def _norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
          scale: float) -> torch.Tensor:
    return (weight + scale * (lora_b @ lora_a)).norm(p=2, dim=1).detach()


def _versions(t: torch.Tensor) -> tuple:
    """Changes whenever ``t``'s values are written in place (an optimizer step, a
    ``copy_`` from a file) or its memory is swapped (``t.data = ...``); a packed
    weight's are those of its stored tensors. A write through ``t.data.copy_``
    bypasses the counter: :func:`forget` the layer after one."""
    stored = getattr(t, "stored", None)
    if isinstance(stored, dict):
        return tuple((v.data_ptr(), v._version) for v in stored.values())
    return (t.data_ptr(), t._version)


def _context(weight: torch.Tensor) -> tuple:
    """What else the computed norm depends on: autocast changes the product's dtype."""
    kind = weight.device.type
    on = torch.is_autocast_enabled(kind)
    return (kind, on, torch.get_autocast_dtype(kind) if on else None)


def weight_norm(layer) -> torch.Tensor:
    """``||W + s·B·A||`` per output row of the LoRA ``layer``, detached.

    Training (``layer.training`` with gradients on): computed afresh each call.
    Otherwise it is kept for the layer and reused while the very same ``W``,
    ``A`` and ``B`` tensors hold the same values (their version counters, which
    every in-place write bumps: optimizer steps, loads) under the same scale
    and autocast; anything else computes it again. Tensors that keep no version
    counter (made under ``torch.inference_mode``) are never cached."""
    p = layer._parameters
    tensors = (p["weight"], p["lora_A"], p["lora_B"])
    if layer.training and torch.is_grad_enabled():
        return _norm(layer._weight_out_in(), tensors[1], tensors[2], layer.scale)
    try:
        versions = tuple(_versions(t) for t in tensors)
    except RuntimeError:  # an inference tensor: no version counter to trust
        return _norm(layer._weight_out_in(), tensors[1], tensors[2], layer.scale)
    context = (layer.scale, _context(tensors[0]))
    hit = _NORMS.get(layer)
    if hit is not None and hit[1] == versions and hit[2] == context and \
            all(ref() is t for ref, t in zip(hit[0], tensors)):
        return hit[3]
    norm = _norm(layer._weight_out_in(), tensors[1], tensors[2], layer.scale)
    _NORMS[layer] = (tuple(weakref.ref(t) for t in tensors), versions, context, norm)
    return norm


def forget(layer) -> None:
    """Drop ``layer``'s kept norm (it is recomputed on the next call)."""
    _NORMS.pop(layer, None)


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


__all__ = ["adapted_output", "forget", "initial_magnitude", "merged",
           "weight_norm"]
