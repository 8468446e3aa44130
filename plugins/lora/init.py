"""LoRA initialisations that start from the base weight: PiSSA and OLoRA.

Both put the weight's principal part into the adapter and leave the rest in
the base, as HF PEFT's ``pissa_init`` / ``olora_init`` do:

* PiSSA (Meng et al. 2024): ``W = U S Vᵀ``; ``B₀ = U_r √(S_r/s)``,
  ``A₀ = √(S_r/s) V_rᵀ`` (exact SVD, or ``torch.svd_lowrank`` with ``niter``
  subspace iterations, HF's ``pissa_niter_N``);
* OLoRA (Büyükakyüz 2024): ``W = Q R``; ``B₀ = Q_r``, ``A₀ = R_r``;

and the base weight becomes the residual ``W_res = W − s·B₀A₀``, written into
the base's own tensor (same object, same memory). So the outputs are
unchanged at apply up to rounding, and **the frozen-base promise holds for the
residual**: from apply on, ``W_res`` stays bit-identical through training,
saving and loading. The original ``W`` is kept (a copy, as ``[[train]]``
keeps the values it trains) and written back whenever the adapter is not
active (switching, :func:`peftspec.disabled`, removal), so the plain base
model stays bit-identical too; merge writes ``W_res + s·B·A``.

The adapter file stores ``B₀`` and ``A₀`` beside the trained ``A`` and ``B``
(``lora_A_init``, ``lora_B_init``): loading recomputes the very same residual
from the original weight, bit for bit, however the SVD would round on
another machine. HF PEFT's export converts the adapter back against the
original base, as ``path_initial_model_for_weight_conversion`` does: rank
``2r``, ``A' = [A; A₀]``, ``B' = [B, −B₀]``, alpha doubled (× √2 with rsLoRA)
so the scale is the same.
"""

from __future__ import annotations

import torch

#: what ``peftspec plan`` says about a rule with one of these inits
BASE_NOTE = ("init '{init}' rewrites the base weights of its {n} module(s) to the residual "
             "W - s*B0*A0: the frozen-base promise holds for that residual (the original "
             "weights are kept and come back whenever this adapter is off)")

INITS = ("pissa", "olora")


def factors(weight_out_in: torch.Tensor, r: int, scale: float, init: str, niter: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A₀, B₀)`` in float32 for an (out, in) weight, as HF PEFT computes them."""
    w = weight_out_in.detach().to(torch.float32)
    if w.dtype not in (torch.float32,):  # pragma: no cover - .to above guarantees it
        raise TypeError("PiSSA/OLoRA need a float weight")
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if niter:
        v, s, u = torch.svd_lowrank(w, r, niter=niter)
        uh = u.t()
    else:
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        v, s, uh = v[:, :r], s[:r], uh[:r]
    s = s / scale
    root = torch.diag(torch.sqrt(s))
    return (root @ uh).contiguous(), (v @ root).contiguous()


def residual(original_out_in: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor,
             scale: float) -> torch.Tensor:
    """``W − s·B₀A₀`` in the weight's dtype; the same inputs give the same bits."""
    w = original_out_in.to(torch.float32)
    return (w - scale * (b0 @ a0)).to(original_out_in.dtype)


class BaseRewrite:
    """The original weight of one module and the factors its residual came from.

    ``write_residual()`` / ``write_original()`` copy into the base tensor in
    place; the promise's pointer check sees the same memory throughout."""

    def __init__(self, weight: torch.Tensor, transposed: bool, a0: torch.Tensor,
                 b0: torch.Tensor, scale: float):
        self.weight, self.transposed, self.scale = weight, transposed, scale
        self.original = weight.detach().clone()
        self.a0, self.b0 = a0, b0

    def _out_in(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.transposed else t

    @torch.no_grad()
    def write_residual(self) -> None:
        res = residual(self._out_in(self.original), self.a0, self.b0, self.scale)
        self.weight.copy_(self._out_in(res))

    @torch.no_grad()
    def write_original(self) -> None:
        self.weight.copy_(self.original)

    def set_factors(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Factors from an adapter file: the residual they give, written now."""
        self.a0 = a0.to(torch.float32).to(self.a0.device).clone()
        self.b0 = b0.to(torch.float32).to(self.b0.device).clone()
        self.write_residual()


def init_from_weight(module, init: str, niter: int) -> BaseRewrite:
    """Initialise a :class:`LoRALinear`'s ``lora_A``/``lora_B`` by ``init`` from its
    weight and rewrite the weight to the residual; returns the rewrite record."""
    w = module._weight_out_in()
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"init '{init}' needs a float32, float16 or bfloat16 weight, not "
                         f"{w.dtype}")
    a0, b0 = factors(w, module.r, module.scale, init, niter)
    with torch.no_grad():
        module.lora_A.copy_(a0)
        module.lora_B.copy_(b0)
    rewrite = BaseRewrite(module.weight, module.kind == "conv1d", a0, b0, module.scale)
    rewrite.write_residual()
    return rewrite


def hf_converted(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF PEFT's conversion to a plain LoRA against the original base (rank 2r):
    ``s·B'A' = s·BA − s·B₀A₀``."""
    return (torch.cat([a, a0.to(a.dtype)], dim=0),
            torch.cat([b, -b0.to(b.dtype)], dim=1))
