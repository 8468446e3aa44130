"""LoHa (Hyeon-Woo et al., FedPara; LyCORIS): a low-rank Hadamard product update.

``ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha/r`` beside a frozen ``nn.Linear``: two
rank-``r`` products multiplied element-wise, so the update can reach rank
``r²`` with the parameters of two rank-``r`` LoRAs, ``2·r·(in + out)``.
As HF PEFT initialises it: ``W1a``, ``W1b``, ``W2a`` Kaiming-uniform, ``W2b``
zero, so the update is zero and outputs are unchanged at apply. Tensors are
HF PEFT's names and shapes: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in),
``hada_w2_a`` (out, r), ``hada_w2_b`` (r, in). Mergeable (``W += ΔW``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftspec.plugin_api import Method, hookimpl, option, selectors

from .lycoris import DeltaLinear, kaiming_, linear_only

NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True)
class LoHaOptions:
    modules: tuple[str, ...] = selectors(doc="nn.Linear modules to adapt")
    r: int = option(8, doc="rank of each of the two Hadamard factors", min=1)
    alpha: float = option(8.0, doc="scale numerator: s = alpha / r")


class LoHaLinear(DeltaLinear):
    """``W + s·(W1a·W1b) ⊙ (W2a·W2b)`` beside a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, opts: LoHaOptions):
        w = base.weight
        (out_f, in_f), r = w.shape, opts.r
        # drawn in HF PEFT's order: w1_a, w1_b, w2_a; w2_b = 0, so ΔW starts at 0
        super().__init__(base, hada_w1_a=kaiming_(w.new_empty((out_f, r))),
                         hada_w1_b=kaiming_(w.new_empty((r, in_f))),
                         hada_w2_a=kaiming_(w.new_empty((out_f, r))),
                         hada_w2_b=w.new_zeros((r, in_f)))
        vars(self).update(r=r, scale=opts.alpha / r)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {n: self._parameters[n] for n in NAMES}

    def delta(self) -> torch.Tensor:
        """``((W1a·W1b) ⊙ (W2a·W2b))·s``, in HF PEFT's order of operations."""
        p = self._parameters
        h1, h2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
        if self.grad_wanted():
            return h1 * h2 * self.scale
        return h1.mul_(h2).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


class LoHa(Method):
    name = "loha"
    family = "reparameterize"
    Options = LoHaOptions
    summary = "low-rank Hadamard product update (LyCORIS LoHa); Linear"
    unchanged_at_apply = True  # hada_w2_b = 0

    def check(self, module, step):
        return linear_only(module, "LoHa")

    def count_params(self, module, step):
        out_f, in_f = module.weight.shape
        return 2 * step.options.r * (out_f + in_f)

    def apply(self, module, step):
        return LoHaLinear(module, step.options)

    def merge(self, installed, original):
        installed.merge_into(original)
        return original

@hookimpl
def register_methods(register):
    register(LoHa())
