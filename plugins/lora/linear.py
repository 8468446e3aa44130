"""LoRA (and DoRA) beside a frozen ``nn.Linear`` or GPT-2 ``Conv1D``: the module a
LoRA rule installs, with its fused forward and its per-row paths."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import dequantized, init_module, linear_dims

from ..base_layer import base_output
from . import dora, init as lora_init
from .kept import kept
from .options import LoRAOptions


@lru_cache(maxsize=None)
def kaiming_bound(fan_in: int) -> float:
    """The bound of ``nn.init.kaiming_uniform_(w, a=math.sqrt(5))`` for this fan-in,
    computed exactly as torch computes it (that call's checks cost more than the draw)."""
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


class LoRALinear(nn.Module):
    """LoRA beside a frozen ``nn.Linear`` or ``Conv1D`` (``fan_in_fan_out``)."""

    def __init__(self, base: nn.Module, kind: str, opts: LoRAOptions):
        init_module(self)  # = super().__init__(), at a quarter of the cost
        n_in, n_out = linear_dims(base, kind)
        # Plain attributes go straight into __dict__: nn.Module.__setattr__ costs
        # microseconds per call, which adds up when a spec patches thousands of modules.
        vars(self).update(kind=kind, in_features=n_in, out_features=n_out, r=opts.r,
                          scale=opts.scale, dropout=opts.dropout, dora=opts.dora)
        if kind == "conv1d":
            self.nf = base.nf
        w = base.weight
        a = w.new_empty((opts.r, n_in))  # initialised before it becomes a Parameter
        if opts.init == "gaussian":
            nn.init.normal_(a, std=1.0 / opts.r)
        else:  # = nn.init.kaiming_uniform_(a, a=math.sqrt(5)), HF PEFT's init, draw for draw
            bound = kaiming_bound(n_in)
            a.uniform_(-bound, bound)
        # Registered in one go, for the same reason (each __setattr__ of a Parameter
        # runs a failing hasattr): names cannot clash on a fresh module. weight and
        # bias are the base's own Parameter objects; bias may be None, as in nn.Linear.
        self._parameters.update(weight=w, bias=base.bias, lora_A=nn.Parameter(a),
                                lora_B=nn.Parameter(w.new_zeros((n_out, opts.r))))
        if opts.dora:
            self.lora_magnitude = nn.Parameter(dora.initial_magnitude(self._weight_out_in()))
        # PiSSA / OLoRA: A, B from the weight, the weight rewritten to the residual
        vars(self)["rewrite"] = lora_init.init_from_weight(self, opts.init, opts.niter) \
            if opts.init in lora_init.INITS else None

    def adapter_params(self) -> dict[str, nn.Parameter]:
        p = self._parameters  # not self.lora_A: nn.Module.__getattr__ costs, thousands of times
        out = {"lora_A": p["lora_A"], "lora_B": p["lora_B"]}
        if self.dora:
            out["lora_magnitude"] = p["lora_magnitude"]
        return out

    def param_roles(self) -> dict[str, str]:
        """LoRA+ trains ``B`` faster (``[train_config] loraplus_lr_ratio``)."""
        return {"lora_B": "B"}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """With PiSSA / OLoRA, also the initial factors the residual base came from."""
        out = self.adapter_params()
        if self.rewrite is not None:
            out.update(lora_A_init=self.rewrite.a0, lora_B_init=self.rewrite.b0)
        return out

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, p in self.adapter_params().items():
            p.copy_(tensors[key])
        dora.forget(self)  # copy_ bumps the versions anyway; say so where it happens
        if self.rewrite is not None:
            self.rewrite.set_factors(tensors["lora_A_init"], tensors["lora_B_init"])

    @property
    def rows_refusal(self) -> str | None:
        """Why per-row batches cannot run this module (its base weight is rewritten)."""
        if self.rewrite is None:
            return None
        return ("its init rewrote the base weight to a residual (PiSSA / OLoRA), which "
                "other rows of a per-row batch cannot share")

    def _weight_out_in(self) -> torch.Tensor:
        # A [[freeze]]-packed weight (nf4, int8...) comes back as a temporary dense
        # copy, never stored (peftspec.core.packed); a plain weight is itself.
        w = dequantized(self.weight)
        return w.t() if self.kind == "conv1d" else w

    def delta(self) -> torch.Tensor:
        """``s·B·A`` as an (out, in) matrix, computed in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    _base = base_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dora or not x.is_contiguous():
            return self.adapt(x, self._base(x))
        # Plain LoRA, fused, on 2-D views: the GEMM adds s·(h·Aᵀ)·Bᵀ straight into
        # the base output (addmm_), with no (tokens × out) temporary and no separate
        # add pass. For a contiguous x the base call on the 2-D view is the very
        # kernel call the base module makes, so outputs stay bit-identical.
        p = self._parameters  # not self.weight: nn.Module.__getattr__, 4 times a call
        b = p["lora_B"]
        x2 = x.view(-1, x.shape[-1])
        if self.kind == "conv1d":
            out = torch.addmm(p["bias"], x2, p["weight"])
        else:
            out = F.linear(x2, p["weight"], p["bias"])
        h = F.dropout(x2, self.dropout, self.training) if self.dropout else x2
        after_a = F.linear(h, p["lora_A"])
        if out.dtype == b.dtype == after_a.dtype:
            out.addmm_(after_a, self._b_t(b), alpha=self.scale)
        else:  # autocast (in-place ops are not cast, so let F.linear cast B), and a
            # packed base under autocast: its fp32 output, a bf16 ``after_a``
            out.add_(F.linear(after_a, b), alpha=self.scale)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _b_t(self, b: torch.Tensor) -> torch.Tensor:
        """``Bᵀ`` for the update's product: a view while gradients flow into ``B``;
        otherwise a contiguous (r, out) copy kept while ``B`` holds its values
        (:mod:`.kept`). At one token a step the product with the transposed view
        is a row of length-r dot products, which costs about 3x the product with
        the copy's rows (axpys of length out): on SmolLM2 a tenth of the base's time per token."""
        if torch.is_grad_enabled() and b.requires_grad:
            return b.t()
        return kept(self, "b_t", (b,), None, lambda: b.t().contiguous())

    @property
    def add_rows(self):
        """Per-row batches: ``add_rows(x, out, idx)`` adds this adapter's update
        for rows ``idx`` of ``x`` into ``out`` in place (plain LoRA only; DoRA
        rescales the base output and goes through :meth:`adapt`)."""
        return None if self.dora else self._add_rows

    def _add_rows(self, x: torch.Tensor, out: torch.Tensor, idx: torch.Tensor) -> None:
        h = x.index_select(0, idx)
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B)
        out.index_add_(0, idx, delta, alpha=self.scale)

    @staticmethod
    def add_rows_batched(per_row: list, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Per-row batches with a (possibly) different adapter in every row, in two
        batched GEMMs: row ``i`` gets ``s_i·(x_i·A_iᵀ)·B_iᵀ`` added into ``out`` in
        place (``per_row[i]`` is that row's :class:`LoRALinear`, or None for the base).
        The cost is that of one adapter over the whole batch, whatever the mix.
        Returns False, having done nothing, where it does not apply (DoRA, ranks that
        differ, dropout while training, a dtype or layout it cannot add into)."""
        mods = list({id(m): m for m in per_row if m is not None}.values())
        if not mods or any(m.dora for m in mods) or len({m.r for m in mods}) != 1:
            return False
        if any(m.dropout and m.training for m in mods) or not out.is_contiguous():
            return False
        dtype = mods[0].lora_B.dtype
        if out.dtype != dtype or x.dtype != dtype or any(m.lora_B.dtype != dtype for m in mods):
            return False
        slot = {id(m): i for i, m in enumerate(mods)}
        a = torch.stack([m.lora_A for m in mods])                 # (G, r, in)
        b = torch.stack([m.lora_B * m.scale for m in mods])       # (G, out, r), scaled
        if any(m is None for m in per_row):
            a = torch.cat([a, a.new_zeros((1,) + a.shape[1:])])  # base rows: a zero update
            b = torch.cat([b, b.new_zeros((1,) + b.shape[1:])])
        index = torch.tensor([slot[id(m)] if m is not None else len(mods) for m in per_row],
                             device=x.device)
        n = x.shape[0]
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.index_select(0, index).transpose(1, 2))
        out.view(n, -1, out.shape[-1]).baddbmm_(h, b.index_select(0, index).transpose(1, 2))
        return True

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted output, given the base output ``out`` for ``x`` (which it
        may overwrite). Per-row batches compute the base once for all rows."""
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B)
        if not self.dora:
            return out.add_(lora, alpha=self.scale)
        return dora.adapted_output(dora.weight_norm(self), self.scale, self.lora_magnitude,
                                   self.bias, out, lora)

    def merged_weight(self) -> torch.Tensor:
        """The folded weight in the base's layout and dtype (math in float32)."""
        w = self._weight_out_in().float()
        new = w + self.delta()
        if self.dora:
            new = dora.merged(new, self.lora_magnitude)
        if self.kind == "conv1d":
            new = new.t()
        return new.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"{self.kind}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scale={self.scale:g}, dora={self.dora}")
