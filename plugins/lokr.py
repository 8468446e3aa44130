"""LoKr (Yeh et al.; LyCORIS): a Kronecker product update.

``ΔW = W1 ⊗ W2 · alpha/r`` beside a frozen ``nn.Linear`` of shape
``(out, in)``, with ``out = a·c`` and ``in = b·d`` split by HF PEFT's
factorization rule (:func:`factorization`: the divisor pair nearest the
square root, or ``decompose_factor`` when it divides): ``W1`` is (a, b),
``W2`` is (c, d). Each factor is a full matrix (``lokr_w1``, ``lokr_w2``) or
a rank-``r`` product (``lokr_w1_a`` · ``lokr_w1_b``, ``lokr_w2_a`` ·
``lokr_w2_b``) exactly where HF PEFT makes it one: ``W2`` when
``r < max(c, d)/2``, ``W1`` only with ``decompose_both`` and
``r < max(a, b)/2``. As HF PEFT initialises it, ``W1`` (or ``W1a``) is zero,
so outputs are unchanged at apply; the rest is Kaiming-uniform. Tensor names
and shapes are HF PEFT's. Mergeable (``W += ΔW``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from peftspec.plugin_api import Method, hookimpl, option, selectors

from .lycoris import DeltaLinear, kaiming_, linear_only


@dataclass(frozen=True)
class LoKrOptions:
    modules: tuple[str, ...] = selectors(doc="nn.Linear modules to adapt")
    r: int = option(8, doc="rank of a factor that is decomposed (W2 when r < max(c, d)/2)",
                    min=1)
    alpha: float = option(8.0, doc="scale numerator: s = alpha / r")
    decompose_both: bool = option(False, doc="also decompose W1 into a rank-r product "
                                             "(where r < max(a, b)/2)")
    decompose_factor: int = option(-1, doc="split each dimension as (factor, dim/factor) "
                                           "where factor divides it; -1: nearest the square root",
                                   min=-1)

    def __post_init__(self):
        if self.decompose_factor == 0:
            raise ValueError("decompose_factor must be -1 (nearest the square root) or >= 1")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """HF PEFT's (and LyCORIS') split of ``dimension`` into ``(m, n)``, ``m <= n``:
    ``(factor, dimension/factor)`` when ``factor`` divides it, else the divisor
    pair with the smallest sum whose smaller part does not exceed ``factor``
    (any, for -1). ``factorization(128) == (8, 16)``, ``factorization(127) == (1, 127)``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


def layout(out_f: int, in_f: int, opts) -> tuple[tuple[int, int, int, int], bool, bool]:
    """``((a, b, c, d), full_w1, full_w2)`` for a (out, in) weight, as HF PEFT decides."""
    return _layout(out_f, in_f, opts.r, opts.decompose_both, opts.decompose_factor)


@lru_cache(maxsize=1024)  # a deep model asks for the same few shapes thousands of times
def _layout(out_f: int, in_f: int, r: int, both: bool, factor: int):
    in_m, in_n = factorization(in_f, factor)
    out_l, out_k = factorization(out_f, factor)
    full_w1 = not (both and r < max(out_l, in_m) / 2)
    full_w2 = not (r < max(out_k, in_n) / 2)
    return (out_l, in_m, out_k, in_n), full_w1, full_w2


def tensor_names(full_w1: bool, full_w2: bool) -> tuple[str, ...]:
    return (("lokr_w1",) if full_w1 else ("lokr_w1_a", "lokr_w1_b")) + \
        (("lokr_w2",) if full_w2 else ("lokr_w2_a", "lokr_w2_b"))


class LoKrLinear(DeltaLinear):
    """``W + s·W1 ⊗ W2`` beside a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, opts: LoKrOptions):
        w = base.weight
        r = opts.r
        (a, b, c, d), full_w1, full_w2 = layout(w.shape[0], w.shape[1], opts)
        # in HF PEFT's order of draws: W1 (zero) before W2, a before b
        params = {}
        if full_w1:
            params["lokr_w1"] = w.new_zeros((a, b))
        else:
            params["lokr_w1_a"] = w.new_zeros((a, r))
            params["lokr_w1_b"] = kaiming_(w.new_empty((r, b)))
        if full_w2:
            params["lokr_w2"] = kaiming_(w.new_empty((c, d)))
        else:
            params["lokr_w2_a"] = kaiming_(w.new_empty((c, r)))
            params["lokr_w2_b"] = kaiming_(w.new_empty((r, d)))
        super().__init__(base, **params)
        vars(self).update(r=r, scale=opts.alpha / r, full_w1=full_w1, full_w2=full_w2,
                          names=tensor_names(full_w1, full_w2))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {n: self._parameters[n] for n in self.names}

    def delta(self) -> torch.Tensor:
        p = self._parameters
        w1 = p["lokr_w1"] if self.full_w1 else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if self.full_w2 else p["lokr_w2_a"] @ p["lokr_w2_b"]
        out = torch.kron(w1, w2)
        return out * self.scale if self.grad_wanted() else out.mul_(self.scale)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scale={self.scale:g}, tensors={','.join(self.names)}")


def _count(out_f: int, in_f: int, opts) -> int:
    (a, b, c, d), full_w1, full_w2 = layout(out_f, in_f, opts)
    n1 = a * b if full_w1 else opts.r * (a + b)
    n2 = c * d if full_w2 else opts.r * (c + d)
    return n1 + n2


class LoKr(Method):
    name = "lokr"
    family = "reparameterize"
    Options = LoKrOptions
    summary = "Kronecker product update W1 ⊗ W2 (LyCORIS LoKr); Linear"
    unchanged_at_apply = True  # W1 (or W1a) = 0

    def check(self, module, step):
        return linear_only(module, "LoKr")

    def count_params(self, module, step):
        out_f, in_f = module.weight.shape
        return _count(out_f, in_f, step.options)

    def apply(self, module, step):
        return LoKrLinear(module, step.options)

    def merge(self, installed, original):
        installed.merge_into(original)
        return original

@hookimpl
def register_methods(register):
    register(LoKr())
