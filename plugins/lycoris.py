"""What LoHa and LoKr (the LyCORIS family) share; not a plugin itself.

Both replace an ``nn.Linear`` by a module that adds a dense update
``ΔW = f(factors)·alpha/r`` to the frozen weight, both merge by adding
``ΔW``, and both map to HF PEFT's ``LycorisConfig`` (their codecs share
``peftspec_plugins.hf_peft.lycoris``). This module holds the common part of
the methods: :class:`DeltaLinear` (forward, per-row ``adapt``, merge), the
Linear-only check and HF PEFT's Kaiming init. Uses only peftspec's public
plugin API.

HF PEFT's LoHa and LoKr adapt ``nn.Linear`` (and convolutions) but not
transformers' ``Conv1D`` (GPT-2's attention and MLP), so neither do these:
an adapter peftspec writes is one HF PEFT can load.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import init_module, parameter


def linear_only(module: nn.Module, method: str) -> str | None:
    """``check``: why ``module`` cannot take ``method`` (``None`` if it can)."""
    if isinstance(module, nn.Linear):
        return None
    if type(module).__name__ == "Conv1D":
        return (f"{method} adapts nn.Linear only; GPT-2's Conv1D is not supported (HF PEFT's "
                f"{method} does not adapt it either); use lora or vera there")
    return f"{method} adapts nn.Linear modules only"


@lru_cache(maxsize=None)
def _bound(fan_in: int) -> float:
    gain = math.sqrt(2.0 / (1 + 5))
    return math.sqrt(3.0) * gain / math.sqrt(fan_in)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(t, a=sqrt(5))`` (HF PEFT's init), without its checks
    (the bound is computed once per fan-in: a deep model asks for a few, thousands of times)."""
    bound = _bound(t.shape[1])
    return t.uniform_(-bound, bound)


class DeltaLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a dense update ``self.delta()`` (out, in).

    Keeps the base's ``weight`` and ``bias`` objects under their names. The
    forward folds the update into the weight for one GEMM, ``x·(W + ΔW)ᵀ + b``,
    where HF PEFT runs two (``x·Wᵀ + b + x·ΔWᵀ``): the same function, cheaper
    for any batch of more than a few tokens; with ``ΔW = 0`` at apply the
    weight is ``W`` bit for bit, so outputs are the base's exactly.
    Subclasses set ``scale`` and define ``delta()`` and ``adapter_params()``.
    """

    scale: float

    def __init__(self, base: nn.Linear, **params: torch.Tensor):
        """``params``: the subclass's adapter tensors (name -> initialised tensor),
        registered after ``weight`` and ``bias`` in this order.

        Attributes go straight into ``__dict__`` and parameters into ``_parameters``:
        ``nn.Module.__init__`` and ``__setattr__`` cost microseconds a call, and a spec
        adapting every projection of a deep model builds thousands of these."""
        init_module(self)  # = super().__init__()
        w = base.weight
        vars(self).update(out_features=w.shape[0], in_features=w.shape[1])
        # weight and bias are the base's own Parameter objects (bias may be None)
        self._parameters.update(weight=w, bias=base.bias,
                                **{k: parameter(t) for k, t in params.items()})

    def delta(self) -> torch.Tensor:  # pragma: no cover - subclasses define it
        """``ΔW`` (out, in), a fresh tensor (in-place steps where no gradient is wanted)."""
        raise NotImplementedError

    def grad_wanted(self) -> bool:
        """Whether autograd must see the update (else it is built in place, in fewer
        passes over out x in memory: inference, ``torch.no_grad``)."""
        return torch.is_grad_enabled() and any(
            p.requires_grad for p in self.adapter_params().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.delta().to(self.weight.dtype)
        # W + ΔW; in place on the fresh ΔW where autograd does not need it (equal bit for
        # bit: IEEE addition commutes)
        w = self.weight + d if self.grad_wanted() else d.add_(self.weight)
        return F.linear(x, w, self.bias)

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted output given the base output ``out`` (per-row batches)."""
        return out + F.linear(x, self.delta().to(self.weight.dtype))

    @torch.no_grad()
    def merge_into(self, original: nn.Linear) -> None:
        """``W += ΔW`` in float32 (float64 stays float64), one cast back."""
        w = original.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        w.copy_((w.to(dt) + self.delta().to(dt)).to(w.dtype))
