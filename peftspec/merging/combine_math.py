"""The arithmetic of ``peftspec combine``, one target module at a time.

Every method is defined on the dense updates ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ`` (``sᵢ`` the
input's exact scale: ``alpha/r``, ``alpha/sqrt(r)`` with rsLoRA, per rule), so
that the result is what the words say, not what summing factors happens to give
(HF PEFT's ``add_weighted_adapter`` sums the ``A`` and the ``B`` factors
separately for its non-SVD types, which adds the cross terms ``Bᵢ·Aⱼ``):

``cat``
    ``Σ wᵢ·ΔWᵢ`` exactly, by concatenation: ``A' = [A₁; A₂; …]``,
    ``B' = [w₁s₁B₁, w₂s₂B₂, …]``, rank ``Σ rᵢ``. No decomposition, no
    rounding beyond the one product ``wᵢ·sᵢ·Bᵢ``.
``linear``
    ``Σ wᵢ·ΔWᵢ`` in SVD form: its best rank-``R`` approximation, ``R``
    defaulting to ``Σ rᵢ`` (capped at ``min(out, in)``), which is exact. The
    SVD is taken through the factors (QR of the concatenated ``B`` and ``Aᵀ``,
    then the SVD of a small ``k×k`` core), never densely, so it costs
    ``O((out+in)·k²)``.
``svd``
    the same, ``R`` defaulting to the largest input rank (HF PEFT's default).
``ties``
    TIES-merging on the dense ``ΔWᵢ``, as HF PEFT's ``merge_utils.ties``
    defines it on a tensor: keep each ``ΔWᵢ``'s ``⌊density·numel⌋`` entries of
    largest magnitude; elect each entry's sign, ``sign(Σᵢ ΔWᵢ)`` (``"total"``)
    or ``sign(Σᵢ sign ΔWᵢ)`` (``"frequency"``), ``+`` on a tie; average the
    weighted entries ``wᵢ·ΔWᵢ`` whose sign agrees with it (divided by how
    many agree, at least one); then the best rank-``R`` approximation,
    ``R`` defaulting to the largest input rank.
``dare_linear``
    DARE: each ``ΔWᵢ`` keeps each entry with probability ``density`` and is
    rescaled by ``1/density`` (mask from :func:`dare_mask`, seeded, so a run is
    reproducible); then ``Σ wᵢ·ΔWᵢ`` and rank ``R`` as for ``ties``.
``dare_ties``
    the DARE masks, then TIES's sign election and disjoint mean.

An input that lacks the target contributes a zero update (the union rule of
:mod:`peftspec.merging.combine`); that is exact for every method here: a zero update
adds nothing to a sum, and its sign (zero) never agrees with an elected one.

The ``R`` factors are split evenly, ``B' = U·√S``, ``A' = √S·Vᵀ``, so both
have the same scale (the better start should the result be trained further).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
DENSE = ("ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Term:
    """One input adapter's LoRA on the target: ``ΔW = scale·B·A`` with ``A``
    (r, in) and ``B`` (out, r), and its ``weight`` in the combination; ``index``
    is the input's position (it seeds that input's DARE mask)."""

    index: int
    weight: float
    scale: float
    A: torch.Tensor
    B: torch.Tensor

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        """``scale·B·A`` (out, in) in ``dtype``."""
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scale


@dataclass(frozen=True)
class Result:
    """The combined factors and, for methods that truncate, the relative
    Frobenius error ``‖M − B'·A'‖ / ‖M‖`` of that truncation (0 where exact)."""

    A: torch.Tensor
    B: torch.Tensor
    truncation: float


def dare_mask(shape: tuple[int, ...], density: float, seed: int, target: str,
              index: int) -> torch.Tensor:
    """The DARE keep-mask of input ``index`` on ``target``: a bool tensor, each
    entry ``True`` with probability ``density``.

    Drawn as ``torch.rand(shape) < density`` from a CPU generator seeded by the
    first 8 bytes of ``SHA-256(f"{seed}:{index}:{target}")``: a mask depends on
    the seed, the input's position and the target's name only, so it is the
    same on every machine and whatever the other targets are."""
    key = hashlib.sha256(f"{seed}:{index}:{target}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2 ** 63 - 1))
    return torch.rand(shape, generator=gen) < density


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``⌊density·numel⌋`` largest-magnitude entries zeroed
    (HF PEFT's ``magnitude_based_pruning``; ``density >= 1`` keeps all)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(t.abs().reshape(-1), k=k).indices] = True
    return t * keep.reshape(t.shape)


def ties_merge(tasks: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES's sign election and disjoint mean over ``tasks`` (n, ...), already
    pruned: the sign is elected on the unweighted tensors, the mean taken over
    the weighted ones that agree (HF PEFT's ``ties`` / ``disjoint_merge``)."""
    sign = tasks.sign()
    votes = tasks.sum(0) if sign_method == "total" else sign.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(tasks.dtype)
    agree = sign == elected
    weighted = tasks * weights.to(tasks.dtype).view(-1, *([1] * (tasks.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def dense_combination(terms: list[Term], method: str, *, density: float | None, seed: int,
                      target: str, sign_method: str = "total",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense combined ``ΔW`` (out, in) of a TIES or DARE method."""
    deltas = [t.delta(dtype) for t in terms]
    if method in ("dare_linear", "dare_ties"):
        deltas = [d * dare_mask(tuple(d.shape), density, seed, target, t.index).to(dtype) /
                  density for d, t in zip(deltas, terms)]
    else:  # ties
        deltas = [magnitude_prune(d, density) for d in deltas]
    weights = torch.tensor([t.weight for t in terms], dtype=dtype)
    if method == "dare_linear":
        return sum(w * d for w, d in zip(weights, deltas))
    return ties_merge(torch.stack(deltas), weights, sign_method)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
           out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    root = s[:rank].sqrt()
    total = float(s.square().sum())
    dropped = float(s[rank:].square().sum())
    err = (dropped / total) ** 0.5 if total > 0 else 0.0
    b = (u[:, :rank] * root).to(out_dtype).contiguous()
    a = (root.unsqueeze(1) * vh[:rank]).to(out_dtype).contiguous()
    return a, b, err


def low_rank(m: torch.Tensor, rank: int, out_dtype: torch.dtype) -> Result:
    """The best rank-``rank`` approximation of the dense ``m`` as factors."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    a, b, err = _split(u, s, vh, rank, out_dtype)
    return Result(a, b, err)


def factored_low_rank(b: torch.Tensor, a: torch.Tensor, rank: int,
                      out_dtype: torch.dtype) -> Result:
    """The best rank-``rank`` approximation of ``b @ a`` ((out, k) @ (k, in)),
    computed from the factors in float64: ``b = Qb·Rb``, ``aᵀ = Qa·Ra``, so
    ``b·a = Qb·(Rb·Raᵀ)·Qaᵀ`` and the SVD of the small core gives that of the
    product."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().t())
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
    a2, b2, err = _split(qb @ u, s, vh @ qa.t(), rank, out_dtype)
    return Result(a2, b2, err)


def combine_target(terms: list[Term], method: str, *, rank: int | None, density: float | None,
                   seed: int, target: str, sign_method: str = "total",
                   out_dtype: torch.dtype = torch.float32) -> Result:
    """Combine the inputs' LoRA on one target by ``method`` (see the module doc).

    ``rank``: the output rank ``R`` (``None``: the method's default); it is
    capped at ``min(out, in)``, the largest rank a LoRA may have and the most
    any ``ΔW`` needs, and for ``linear`` and ``svd`` at ``Σ rᵢ``, the most
    the sum can have. Raises ``ValueError`` where ``cat`` would exceed that."""
    n_out, n_in = terms[0].B.shape[0], terms[0].A.shape[1]
    cap = min(n_out, n_in)
    total = sum(t.A.shape[0] for t in terms)
    if method == "cat":
        if total > cap:
            raise ValueError(f"cat gives rank {total} here, more than min(out, in) = {cap} "
                             "that a LoRA may have; use --method linear (exact too)")
        a = torch.cat([t.A.to(out_dtype) for t in terms])
        b = torch.cat([(t.B.double() * (t.weight * t.scale)).to(out_dtype) for t in terms], 1)
        return Result(a.contiguous(), b.contiguous(), 0.0)
    default = total if method == "linear" else max(t.A.shape[0] for t in terms)
    rank = min(default if rank is None else rank, cap)
    if method in ("linear", "svd"):
        rank = min(rank, total)  # ΔW has rank <= Σ rᵢ: more would be exact zeros
        b = torch.cat([t.B.double() * (t.weight * t.scale) for t in terms], 1)
        a = torch.cat([t.A.double() for t in terms])
        return factored_low_rank(b, a, rank, out_dtype)
    dtype = torch.promote_types(out_dtype, torch.float32)
    m = dense_combination(terms, method, density=density, seed=seed, target=target,
                          sign_method=sign_method, dtype=dtype)
    return low_rank(m, rank, out_dtype)
