"""OFT (Qiu et al., 2023; Liu et al., BOFT), in HF PEFT's current form (peft >= 0.18).

The input of a frozen ``nn.Linear`` is rotated block by block before the
layer: ``y = W·(R x) + b`` with ``R = diag(R_1 … R_k)``, ``k`` blocks of
``block_size`` (``k·block_size = in``). Each block is orthogonal, the Cayley
transform of a skew-symmetric ``Q`` whose upper triangle is learned: one row
of ``oft_R`` (k, block_size·(block_size−1)/2) per block, or a single shared
row with ``block_share``. ``oft_R = 0`` gives ``R = I``: outputs are
unchanged at apply. Merged, the weight becomes ``W·Rᵀ`` (rows of ``x`` are
rotated as ``x·R``, as HF PEFT does).

The two Cayley paths of HF PEFT are not the same map, and this follows each
exactly: the Neumann series (``cayley_neumann = true``, HF's default)
computes ``I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1)``, a truncation of
``(I + Q)(I − Q)⁻¹``, while the exact path solves ``R (I + Q) = I − Q``,
i.e. ``R = (I − Q)(I + Q)⁻¹``, its transpose (inverse). An adapter trained
with one path gives other outputs under the other; ``cayley_neumann`` is
stored with it, in the spec and in HF PEFT's config.

Block size or count, as HF PEFT: give one (``block_size``, default 32, or
``r`` blocks); where it does not divide the module's input width it is moved
to the nearest divisor (HF PEFT's ``adjust_oft_parameters``, whose warning
this mirrors in ``peftspec plan``'s parameter counts). Not supported: COFT
(``coft``), module dropout, Conv2d and Embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import Method, hookimpl, option, selectors
from peftspec.plugin_api import init_module, parameter


@dataclass(frozen=True)
class OFTOptions:
    modules: tuple[str, ...] = selectors(doc="nn.Linear modules whose input is rotated")
    block_size: int = option(32, doc="size of each orthogonal block (0: give r instead)", min=0)
    r: int = option(0, doc="number of blocks (0: give block_size instead)", min=0)
    block_share: bool = option(False, doc="one rotation shared by all blocks of a module")
    cayley_neumann: bool = option(True, doc="Cayley transform by a truncated Neumann series "
                                            "(HF PEFT's default) instead of a linear solve")
    neumann_terms: int = option(5, doc="terms of the Neumann series", min=1)

    def __post_init__(self):
        if (self.r == 0) == (self.block_size == 0):
            raise ValueError(f"give exactly one of r ({self.r}) and block_size "
                             f"({self.block_size}), the other 0 (r x block_size = in_features; "
                             "block_size defaults to 32: with r, set block_size = 0)")


def _adjust(in_features: int, value: int) -> int:
    """HF PEFT's ``adjust_oft_parameters``: the divisor of ``in_features`` nearest ``value``."""
    if value < in_features:
        higher = value
        while higher <= in_features and in_features % higher != 0:
            higher += 1
    else:
        return in_features
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def blocks(in_features: int, opts: OFTOptions) -> tuple[int, int]:
    """``(blocks, block_size)`` for a module of this input width, as HF PEFT settles it."""
    if opts.r == 0:
        bs = opts.block_size
        if in_features % bs != 0 or bs > in_features:
            bs = _adjust(in_features, bs)
        return in_features // bs, bs
    r = opts.r
    if in_features % r != 0 or r > in_features:
        r = _adjust(in_features, r)
    return r, in_features // r


@lru_cache(maxsize=64)
def _triu(block_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
    return rows, cols


# The largest block a batched CPU solve handles safely (batches of 144 x 144 pass,
# 151 x 151 fail in the torch issue; a margin below both).
_CPU_BATCHED_SOLVE_MAX = 128


def rotations(vec: torch.Tensor, block_size: int, neumann: bool, terms: int) -> torch.Tensor:
    """The (n, block_size, block_size) orthogonal blocks for ``oft_R`` rows ``vec``,
    computed exactly as HF PEFT's ``OFTRotationModule._cayley_batch``."""
    n = vec.shape[0]
    rows, cols = _triu(block_size, str(vec.device))
    m = vec.new_zeros((n, block_size, block_size))
    m[:, rows, cols] = vec
    q = m - m.transpose(-2, -1)
    if neumann:
        r = torch.eye(block_size, device=vec.device, dtype=vec.dtype).repeat(n, 1, 1)
        if terms > 1:
            r.add_(q, alpha=2.0)
            if terms > 2:
                q2 = torch.bmm(q, q)
                r.add_(q2, alpha=2.0)
                power = q2
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, q)
                    r.add_(power, alpha=2.0)
                power = torch.bmm(power, q)
                r.add_(power)
        return r
    eye = torch.eye(block_size, device=vec.device, dtype=vec.dtype).expand(n, -1, -1)
    if n > 1 and q.device.type == "cpu" and block_size > _CPU_BATCHED_SOLVE_MAX:
        # A batched CPU solve of blocks this large hangs with more than one thread
        # (MKL's "Parameter 6 was incorrect on entry to SLASWP", then both threads
        # spin; pytorch/pytorch#142815, still so in torch 2.13). One solve per block
        # is correct there, forward and backward; a block this size costs more to
        # solve than the extra call does.
        return torch.stack([torch.linalg.solve(eye[0] + q[i], eye[0] - q[i], left=False)
                            for i in range(n)])
    return torch.linalg.solve(eye + q, eye - q, left=False)


class OFTLinear(nn.Module):
    """A frozen ``nn.Linear`` whose input is rotated by learned orthogonal blocks."""

    def __init__(self, base: nn.Linear, opts: OFTOptions):
        # Attributes straight into __dict__, parameters into _parameters: nn.Module's
        # __init__ and __setattr__ cost microseconds a call, thousands of times.
        init_module(self)  # = super().__init__()
        w = base.weight
        out_f, in_f = w.shape
        n_blocks, bs = blocks(in_f, opts)
        vars(self).update(out_features=out_f, in_features=in_f, blocks=n_blocks,
                          block_size=bs, block_share=opts.block_share,
                          neumann=opts.cayley_neumann, terms=opts.neumann_terms)
        n = bs * (bs - 1) // 2
        self._parameters.update(  # weight, bias: the base's own Parameter objects
            weight=w, bias=base.bias,
            oft_R=parameter(w.new_zeros((1 if opts.block_share else n_blocks, n))))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"oft_R": self._parameters["oft_R"]}

    def rotation(self) -> torch.Tensor:
        """The (blocks, block_size, block_size) rotation, one block per input slice."""
        r = rotations(self.oft_R, self.block_size, self.neumann, self.terms)
        return r.expand(self.blocks, -1, -1) if self.block_share else r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rotation()
        h = x.to(r.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        h = torch.einsum("...rk,rkc->...rc", h, r).reshape(x.shape).to(x.dtype)
        return F.linear(h, self.weight, self.bias)

    @torch.no_grad()
    def merge_into(self, original: nn.Linear) -> None:
        """``W ← W·Rᵀ`` in float32 (float64 stays float64), block by block."""
        w = original.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        r = rotations(self.oft_R.to(dt), self.block_size, self.neumann, self.terms)
        r = r.expand(self.blocks, -1, -1) if self.block_share else r
        wb = w.to(dt).reshape(self.out_features, self.blocks, self.block_size)
        w.copy_(torch.einsum("ork,rck->orc", wb, r).reshape(w.shape).to(w.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, blocks={self.blocks}x"
                f"{self.block_size}, block_share={self.block_share}, "
                f"cayley={'neumann(' + str(self.terms) + ')' if self.neumann else 'exact'}")


class OFT(Method):
    name = "oft"
    family = "reparameterize"
    Options = OFTOptions
    summary = "orthogonal fine-tuning: learned block-diagonal rotations of the input; Linear"
    unchanged_at_apply = True  # oft_R = 0: R = I exactly
    example = ('[[reparameterize]]\nmethod = "oft"\nmodules = ["**.q_proj", "**.v_proj"]\n'
               'block_size = 16\n')

    def check(self, module, step):
        if isinstance(module, nn.Linear):
            return None
        if type(module).__name__ == "Conv1D":
            return ("OFT adapts nn.Linear only; GPT-2's Conv1D is not supported (HF PEFT's OFT "
                    "does not adapt it either)")
        return "OFT adapts nn.Linear modules only"

    def count_params(self, module, step):
        n, bs = blocks(module.weight.shape[1], step.options)
        return (1 if step.options.block_share else n) * bs * (bs - 1) // 2

    def apply(self, module, step):
        return OFTLinear(module, step.options)

    def merge(self, installed, original):
        installed.merge_into(original)
        return original

@hookimpl
def register_methods(register):
    register(OFT())
