"""EVA: LoRA's ``A`` from the principal directions of each layer's inputs.

Explained Variance Adaptation (Paischer et al. 2024), as HF PEFT's
``peft.tuners.lora.eva`` computes it, so that the two agree on the same model
and batches: forward passes over a data sample feed every targeted layer's
inputs (the positions the attention mask, and by default the labels, keep)
into an incremental PCA (``torch.svd_lowrank`` with seed 42, ``q = 2k``, four
iterations, ``k = round(r·rho)`` components); layers that see the same input
(q/k/v) share one PCA. The passes cycle over the sample until, for each
layer, the cosine similarity of its components between two passes reaches
``eva_tau`` for the components it may get. The rank budget (the sum of the
rules' ``r``) then goes to the components of highest explained-variance
ratio across all layers (a layer gets between 0 and ``r·rho``), and each
layer's ``A`` becomes its top right-singular vectors (optionally whitened),
``B`` zero: the outputs stay those of the base.

When ranks move (``eva_rho`` > 1), the adapter is rebuilt: its spec is
rewritten with one rule per new rank over exact module paths (alpha scaled by
``new/r`` with ``eva_adjust_scaling``, HF PEFT's ``adjust_scaling_factors``;
rank-0 layers dropped, as HF PEFT drops them), so the saved adapter describes
itself and HF PEFT's export is a plain LoRA with its ``rank_pattern``. The
rewritten rules say ``eva_rho = 1.0``: their ranks are fixed from then on.

Run it through :func:`peftspec.init_from_data` (``peftspec train`` calls it
before the first step). The base weights are read, never written.
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

OPTION_DEFAULTS = {"eva_rho": 2.0, "eva_tau": 0.99, "eva_whiten": False,
                   "eva_adjust_scaling": True, "eva_label_mask": True}


class EvaError(ValueError):
    """EVA cannot run on these batches (too few tokens, no convergence...)."""


class IncrementalPCA:
    """HF PEFT's ``IncrementalPCA`` (from scikit-learn's) in low-rank mode: the state
    after each :meth:`partial_fit` is ``components_`` (k × features),
    ``singular_values_`` and ``explained_variance_ratio_``."""

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4):
        self.k, self.q, self.seed, self.niter = n_components, 2 * n_components, seed, niter
        self.components_ = None
        self.n_seen = torch.tensor([0])
        self.mean_ = self.var_ = None

    def _mean_var(self, x: torch.Tensor):
        count = torch.tensor([x.shape[0]], device=x.device)
        total = self.n_seen.to(x.device) + count
        last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) \
            if self.mean_ is None else self.mean_ * self.n_seen
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        temp = x - new_sum / count
        correction = temp.sum(dim=0, dtype=torch.float64).square()
        new_var = temp.square().sum(dim=0, dtype=torch.float64) - correction / count
        if self.var_ is None:
            return mean, new_var / total, total
        last_over_new = self.n_seen.double() / count
        var = (self.var_ * self.n_seen + new_var + last_over_new / total *
               (last_sum / last_over_new - new_sum).square()) / total
        return mean, var, total

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32).clone()
        n = x.shape[0]
        mean, var, total = self._mean_var(x)
        if self.components_ is None:
            x -= mean
        else:
            batch_mean = x.mean(dim=0)
            x -= batch_mean
            factor = torch.sqrt((self.n_seen.double() / total) * n)
            x = torch.vstack((self.singular_values_.view(-1, 1) * self.components_, x,
                              factor * (self.mean_ - batch_mean)))
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(x, q=self.q, niter=self.niter)
        vt = v.mH
        rows = torch.argmax(vt.abs(), dim=1)  # svd_flip on V: deterministic signs
        vt = vt * torch.sign(vt[range(vt.shape[0]), rows]).view(-1, 1)
        self.n_seen, self.mean_, self.var_ = total, mean, var
        self.components_ = vt[:self.k]
        self.singular_values_ = s[:self.k]
        self.explained_variance_ratio_ = (s.square() / torch.sum(var * total))[:self.k]


@dataclass
class _Layer:
    name: str
    module: nn.Module
    r: int
    max_k: int
    pca: IncrementalPCA | None = None
    converged: torch.Tensor | None = None


def _layer_input(inputs, mask):
    x = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    if mask is not None and x.dim() == 3:
        if x.shape[:2] != mask.shape:
            raise EvaError(f"a layer's input has {tuple(x.shape[:2])} positions but the batch "
                           f"{tuple(mask.shape)}: EVA cannot run beside soft prompts")
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def _mask(batch, label_mask: bool):
    if not isinstance(batch, dict):
        return None
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if label_mask and batch.get("labels") is not None and batch["labels"].shape == ids.shape:
        mask = mask & (batch["labels"] != -100)
    return mask


def _forward(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def compute(model: nn.Module, layers: list[_Layer], batches: list, *, tau: float,
            label_mask: bool, whiten: bool, max_passes: int,
            report: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """Each layer's EVA ``A`` (rank × in, rank possibly 0), as HF PEFT's
    ``get_eva_state_dict`` computes it."""
    if not batches:
        raise EvaError("no batches to compute EVA from")
    current = {"mask": None}
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def record(name):
        def hook(module, inputs, output):
            seen[name] = _layer_input(inputs, current["mask"]).detach()
        return hook

    was_training = model.training
    model.eval()
    try:
        # one pass to find layers that receive equal inputs (q, k, v): one PCA each
        current["mask"] = _mask(batches[0], label_mask)
        handles = [ly.module.register_forward_hook(record(ly.name)) for ly in layers]
        with torch.no_grad():
            _forward(model, batches[0])
        for h in handles:
            h.remove()
        groups: list[list[_Layer]] = []
        for ly in layers:
            for g in groups:
                first = seen[g[0].name]
                if first.shape == seen[ly.name].shape and torch.equal(first, seen[ly.name]):
                    g.append(ly)
                    break
            else:
                groups.append([ly])
        seen.clear()
        for g in groups:
            k = max(ly.max_k for ly in g)
            for ly in g:
                ly.max_k = k
        hook_of = {ly.name: g[0] for g in groups for ly in g}
        owners = [g[0] for g in groups]
        for ly in owners:
            ly.pca = IncrementalPCA(ly.max_k)
            ly.converged = torch.zeros(ly.max_k, dtype=torch.bool)
        # HF PEFT's order: the owners, then the layers sharing an owner's input
        order = owners + [ly for g in groups for ly in g[1:]]
        budget = sum(ly.r for ly in layers)
        rank = {ly.name: ly.max_k for ly in layers}

        def fit(ly):
            def hook(module, inputs, output):
                x = _layer_input(inputs, current["mask"])
                if x.shape[0] < ly.max_k:
                    return  # too few positions in this batch for the components
                before = None if ly.pca.components_ is None else ly.pca.components_.clone()
                ly.pca.partial_fit(x)
                if before is not None:
                    ly.converged = torch.nn.functional.cosine_similarity(
                        ly.pca.components_, before) >= tau
            return hook

        active = {ly.name: ly.module.register_forward_hook(fit(ly)) for ly in owners}
        handles = list(active.values())
        done = {ly.name: False for ly in owners}
        passes = 0
        for batch in itertools.cycle(batches):
            mask = _mask(batch, label_mask)
            for ly in owners:
                ok = bool(torch.all(ly.converged[:rank[ly.name]]))
                if not done[ly.name] and ok:
                    active.pop(ly.name).remove()
                    done[ly.name] = True
                elif done[ly.name] and not ok:
                    active[ly.name] = ly.module.register_forward_hook(fit(ly))
                    handles.append(active[ly.name])
                    done[ly.name] = False
            if all(done.values()):
                break
            if passes >= max_passes:
                left = [n for n, d in done.items() if not d]
                raise EvaError(f"EVA did not converge in {passes} forward passes ({len(left)} "
                               f"of {len(owners)} layers left, e.g. '{left[0]}'); give more "
                               "data or lower eva_tau")
            current["mask"] = mask
            with torch.no_grad():
                _forward(model, batch)
            passes += 1
            if passes == 1 or passes % 10 == 0:
                report(f"EVA: pass {passes}, {sum(done.values())}/{len(owners)} layer inputs "
                       "converged")
            if any(ly.pca.components_ is None for ly in owners):
                if passes >= len(batches):  # a whole round and still nothing: never will
                    small = next(ly for ly in owners if ly.pca.components_ is None)
                    raise EvaError(f"no batch has the {small.max_k} kept positions (tokens) "
                                   f"that '{small.name}' needs for its components; give "
                                   "larger batches or longer examples")
                continue
            rank = _distribution(order, hook_of, budget)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    report(f"EVA: converged after {passes} forward passes")
    out = {}
    for ly in layers:
        owner = hook_of[ly.name]
        k = rank[ly.name]
        u = owner.pca.components_[:k].clone()
        if whiten:
            u /= owner.pca.singular_values_[:k].sqrt().reshape(-1, 1)
        out[ly.name] = u
    return out


def _distribution(order: list[_Layer], hook_of: dict[str, _Layer], budget: int
                  ) -> dict[str, int]:
    """The budget spread over the components of highest explained-variance ratio
    (HF PEFT's ``_get_rank_distribution``, tie order included)."""
    keys, values = [], []
    for ly in order:
        for c in hook_of[ly.name].pca.explained_variance_ratio_[:ly.max_k]:
            keys.append(ly.name)
            values.append(c)
    idx = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in idx[:budget].tolist())
    counts = {ly.name: counts.get(ly.name, 0) for ly in order}
    for ly in order:  # a layer sharing an owner's input never outranks the owner
        owner = hook_of[ly.name]
        if owner is ly:
            continue
        if counts[owner.name] < counts[ly.name]:
            counts[owner.name], counts[ly.name] = counts[ly.name], counts[owner.name]
    return counts


def stderr_report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def layers_for(steps_modules: Iterable[tuple[str, nn.Module, int, float]]) -> list[_Layer]:
    """(name, installed LoRALinear, r, rho) -> the layers EVA fits."""
    return [_Layer(name, module, r, round(r * rho)) for name, module, r, rho in steps_modules]
