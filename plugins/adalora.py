"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form with a rank budget that training allocates.

Each adapted ``nn.Linear`` / GPT-2 ``Conv1D`` gets ``init_r`` triplets: right
vectors ``lora_A`` (r, in), singular values ``lora_E`` (r, 1) and left
vectors ``lora_B`` (out, r); the update is ``ΔW = B·(A ⊙ E)·alpha/(r₀ + 1e-5)``
with ``r₀ = init_r`` for good (HF PEFT's ``ranknum``, which pruning never
changes). ``E`` starts at zero, so outputs are unchanged at apply.

During ``peftspec train`` (:meth:`AdaLoRA.training`), as HF PEFT's
``RankAllocator``: after every optimizer step the importance ``|p·∇p|`` of
every entry is smoothed (``beta1``) and its uncertainty tracked (``beta2``);
after ``tinit`` warm-up steps the total budget falls on a cubic schedule from
``init_r`` per module to ``target_r`` per module at step ``total_step -
tfinal``, every ``deltaT`` steps the least important triplets (over all
modules together) have their ``E`` zeroed, and the final ``tfinal`` steps
keep the final mask. The orthogonal regularizer ``orth_reg_weight · mean
‖AAᵀ − I‖_F, ‖BᵀB − I‖_F`` joins the loss. Which triplets are kept is the
module's ``rank_mask``, stored in the adapter file beside the triplets; HF
PEFT's export drops the pruned ones and writes the mask as ``rank_pattern``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import Method, hookimpl, linear_dims, module_kind, option, selectors
from peftspec.plugin_api import TrainingHooks

from .base_layer import base_output
from peftspec.plugin_api import PeftspecError


@dataclass(frozen=True)
class AdaLoRAOptions:
    modules: tuple[str, ...] = selectors(doc="modules to adapt: Linear or Conv1D")
    init_r: int = option(12, doc="triplets per module at the start", min=1)
    target_r: int = option(8, doc="average triplets per module after allocation", min=0)
    alpha: float = option(8.0, doc="scale numerator: ΔW = B·(A⊙E)·alpha/init_r")
    dropout: float = option(0.0, doc="dropout on the adapter's input", min=0.0, max=0.999)
    tinit: int = option(0, doc="warm-up steps before the budget starts to fall", min=0)
    tfinal: int = option(0, doc="final steps with the final budget fixed", min=0)
    deltaT: int = option(1, doc="steps between two allocations", min=1)
    beta1: float = option(0.85, doc="EMA factor of the importance", min=1e-9, max=0.999999)
    beta2: float = option(0.85, doc="EMA factor of the uncertainty", min=1e-9, max=0.999999)
    orth_reg_weight: float = option(0.5, doc="weight of the orthogonal regularizer", min=0.0)
    total_step: int | None = option(None, doc="steps of the schedule (default: the run's)",
                                    min=1)


class SVDLinear(nn.Module):
    """AdaLoRA's triplets beside a frozen ``nn.Linear`` or ``Conv1D``."""

    def __init__(self, base: nn.Module, kind: str, opts: AdaLoRAOptions):
        super().__init__()
        n_in, n_out = linear_dims(base, kind)
        vars(self).update(kind=kind, in_features=n_in, out_features=n_out, r=opts.init_r,
                          alpha=opts.alpha, dropout=opts.dropout)
        if kind == "conv1d":
            self.nf = base.nf
        w = base.weight
        self.weight, self.bias = w, base.bias  # the base's own tensors, same names
        a = w.new_empty((opts.init_r, n_in))
        b = w.new_empty((n_out, opts.init_r))
        nn.init.normal_(a, mean=0.0, std=0.02)  # HF PEFT's reset_lora_parameters
        nn.init.normal_(b, mean=0.0, std=0.02)
        self.lora_A = nn.Parameter(a)
        self.lora_E = nn.Parameter(w.new_zeros((opts.init_r, 1)))
        self.lora_B = nn.Parameter(b)
        # kept triplets; state, not a parameter (saved through adapter_state)
        self.rank_mask = torch.ones(opts.init_r, dtype=torch.bool, device=w.device)

    @property
    def scale(self) -> float:
        return self.alpha / (self.r + 1e-5)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}

    def param_roles(self) -> dict[str, str]:
        return {"lora_B": "B"}  # LoRA+, as HF PEFT's grouping by name would

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {**self.adapter_params(), "rank_mask": self.rank_mask}

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, p in self.adapter_params().items():
            p.copy_(tensors[key])
        self.rank_mask = tensors["rank_mask"].to(torch.bool).to(self.rank_mask.device).clone()

    _base = base_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x, self._base(x))

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted output given the base output ``out`` (per-row batches share it)."""
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        update = F.linear(F.linear(h, self.lora_A * self.lora_E), self.lora_B)
        return out.add_(update, alpha=self.scale)  # ``out`` is ours to overwrite

    def delta(self) -> torch.Tensor:
        """``ΔW`` as an (out, in) matrix in float32."""
        return (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self.scale

    def merged_weight(self) -> torch.Tensor:
        new = self.delta()
        if self.kind == "conv1d":
            new = new.t()
        return (self.weight.float() + new).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"{self.kind}, in={self.in_features}, out={self.out_features}, "
                f"init_r={self.r}, kept={int(self.rank_mask.sum())}")


class RankAllocator(TrainingHooks):
    """HF PEFT's ``RankAllocator`` over one adapter's AdaLoRA modules (see the module
    docstring); the budget is shared by all modules of the rule(s)."""

    def __init__(self, modules: list[SVDLinear], opts: AdaLoRAOptions, total_step: int):
        self.modules, self.opts, self.total = modules, opts, total_step
        self.init_bgt = sum(m.r for m in modules)
        self.target_bgt = opts.target_r * len(modules)
        self.final_step = total_step - opts.tfinal
        self.reset()

    def reset(self) -> None:
        self.avg_ipt: dict[int, torch.Tensor] = {}
        self.avg_unc: dict[int, torch.Tensor] = {}

    def _tensors(self):
        for m in self.modules:
            yield from (m.lora_A, m.lora_E, m.lora_B)

    # -- the orthogonal regularizer -------------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        if not self.opts.orth_reg_weight or not self.modules:
            return None
        total = 0.0
        for m in self.modules:
            for cov in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                total = total + torch.norm(cov - eye, p="fro")
        return self.opts.orth_reg_weight * total / (2 * len(self.modules))

    # -- importance and allocation ----------------------------------------------------
    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.opts.beta1, self.opts.beta2
        for p in self._tensors():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg = self.avg_ipt.get(id(p), torch.zeros_like(p))
            unc = self.avg_unc.get(id(p), torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt
            self.avg_ipt[id(p)] = avg
            self.avg_unc[id(p)] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def budget(self, step: int) -> tuple[int, bool]:
        """The budget at ``step`` and whether to mask then (HF's ``budget_schedule``)."""
        o = self.opts
        if step <= o.tinit:
            return self.init_bgt, False
        if step > self.total - o.tfinal:
            return self.target_bgt, True
        coeff = 1 - (step - o.tinit) / (self.total - o.tfinal - o.tinit)
        budget = int((self.init_bgt - self.target_bgt) * coeff ** 3 + self.target_bgt)
        return budget, step % o.deltaT == 0

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        return self.avg_ipt.get(id(p), torch.zeros_like(p)) * \
            self.avg_unc.get(id(p), torch.zeros_like(p))

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Zero the ``E`` of the least important triplets, all modules together."""
        scores = []
        for m in self.modules:
            per_a = self._score(m.lora_A).mean(dim=1, keepdim=True)          # (r, 1)
            per_b = self._score(m.lora_B).mean(dim=0, keepdim=False).view(-1, 1)
            scores.append(self._score(m.lora_E).view(-1) +
                          torch.cat([per_a, per_b], dim=1).sum(dim=1).view(-1))
        k = self.init_bgt - budget
        if k <= 0:
            return
        threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item()
        for m, s in zip(self.modules, scores):
            pruned = s <= threshold
            m.lora_E.masked_fill_(pruned.view(-1, 1), 0.0)
            m.rank_mask = ~pruned

    @torch.no_grad()
    def _apply_mask(self) -> None:
        for m in self.modules:
            m.lora_E.masked_fill_(~m.rank_mask.view(-1, 1), 0.0)

    def after_step(self, step: int) -> None:
        """HF PEFT's ``update_and_allocate(step)``."""
        if step < self.final_step:
            self._update_importance()
            budget, mask = self.budget(step)
            if mask:
                self.mask_to_budget(budget)
        elif step == self.final_step:
            self.mask_to_budget(self.budget(step)[0])
            self.reset()
        else:
            self._apply_mask()

    def resume(self, step: int) -> None:
        if step < self.final_step:

            raise PeftspecError(
                f"cannot resume an AdaLoRA run at step {step}: its importance averages (which "
                f"pick the ranks until step {self.final_step}) are not in checkpoints; start "
                f"the run again, or resume from a checkpoint at step {self.final_step} or later")


class AdaLoRA(Method):
    name = "adalora"
    family = "reparameterize"
    Options = AdaLoRAOptions
    summary = "LoRA in SVD form; training allocates the rank budget (init_r -> target_r)"
    unchanged_at_apply = True  # E starts at zero

    def resolve_options(self, options, model):
        if options.target_r > options.init_r:
            raise ValueError(f"target_r = {options.target_r} exceeds init_r = "
                             f"{options.init_r}; the budget only falls")
        if options.total_step is not None and \
                options.tinit >= options.total_step - options.tfinal:
            raise ValueError(f"tinit = {options.tinit} and tfinal = {options.tfinal} leave no "
                             f"step of total_step = {options.total_step} to allocate ranks in")
        return options

    def check(self, module, step):
        kind = module_kind(module)
        if kind not in ("linear", "conv1d"):
            return "AdaLoRA adapts Linear and Conv1D modules only"
        n_in, n_out = linear_dims(module, kind)
        if step.options.init_r > min(n_in, n_out):
            return (f"init_r = {step.options.init_r} exceeds min(in, out) = "
                    f"{min(n_in, n_out)} of this {n_in}x{n_out} module")
        return None

    def count_params(self, module, step):
        n_in, n_out = linear_dims(module, module_kind(module))
        return step.options.init_r * (n_in + n_out + 1)

    def apply(self, module, step):
        return SVDLinear(module, module_kind(module), step.options)

    def merge(self, installed, original):
        with torch.no_grad():
            original.weight.copy_(installed.merged_weight())
        return original

    def training(self, model, steps, total_steps):
        schedules = {s.options.__class__(**{**vars(s.options), "modules": ()}) for s in steps}
        if len(schedules) > 1:
            raise ValueError("AdaLoRA rules of one adapter must share their options but "
                             "'modules' (one budget is allocated over all of them)")
        opts = steps[0].options
        total = opts.total_step or total_steps
        if opts.tinit >= total - opts.tfinal:
            raise ValueError(f"tinit = {opts.tinit} and tfinal = {opts.tfinal} leave no step "
                             f"of the {total} training steps to allocate ranks in; lower "
                             "them or train longer")
        modules = [model.get_submodule(s.target) for s in steps]
        return RankAllocator(modules, opts, total)

@hookimpl
def register_methods(register):
    register(AdaLoRA())
