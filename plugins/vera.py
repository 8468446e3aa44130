"""VeRA (Kopiczko et al., 2024): shared frozen random projections, trained scaling vectors.

Every module of a rule adds ``ΔW = Λ_b · B · Λ_d · A``: ``A`` (r, in) and
``B`` (out, r) are slices of two random matrices that **all modules of the
rule share** and nobody trains, ``vera_A`` (r, max in) and ``vera_B``
(max out, r), sized to the rule's largest module and drawn once from
``seed`` exactly as HF PEFT draws them (``torch.Generator`` on the CPU,
Kaiming-uniform with gain √2, ``vera_A`` first); only the vectors
``vera_lambda_d`` (r) and ``vera_lambda_b`` (out) of each module are
trained, ``out + r`` parameters a module. ``Λ_b = 0`` at apply (``Λ_d =
d_initial``), so outputs are unchanged. Linear and GPT-2's Conv1D, as HF
PEFT; mergeable (``W += ΔW``).

The projections live in one plain object that every VeRA module of the rule
holds (:class:`VeRAProjections`): not parameters, not buffers, not in the
state dict; they follow the input to its device. The rule
sees all its modules before any is built through ``prepare`` (the ``SharesRuleState`` capability). With
``save_projection = true`` (HF PEFT's default) the adapter file stores them
once, under the rule's first module (``<first>.vera_A`` / ``.vera_B``), and
loading takes them from the file; with ``false`` they are drawn again from
the seed at load (smaller files; HF PEFT warns that this may not reproduce
across platforms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import Method, hookimpl, linear_dims, module_kind, option, selectors
from peftspec.plugin_api import init_module, parameter

from .base_layer import base_output


@dataclass(frozen=True)
class VeRAOptions:
    modules: tuple[str, ...] = selectors(doc="modules to adapt: Linear or GPT-2 Conv1D")
    r: int = option(256, doc="rank of the shared random projections", min=1)
    seed: int = option(0, doc="seed of the projections (HF PEFT's projection_prng_key)", min=0)
    save_projection: bool = option(True, doc="store the projections in the adapter file "
                                             "(else they are drawn again from the seed)")
    dropout: float = option(0.0, doc="dropout on the adapter's input", min=0.0, max=0.999)
    d_initial: float = option(0.1, doc="initial value of every entry of vera_lambda_d")


def _kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"conv1d"`` (GPT-2), the maps VeRA adapts; else ``None``."""
    kind = module_kind(module)
    return kind if kind in ("linear", "conv1d") else None


def draw_projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``vera_A`` (r, max_in) and ``vera_B`` (max_out, r), float32, as HF PEFT's
    ``VeraModel._init_vera_A_vera_B`` draws them, value for value."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
        out.append(torch.empty(shape).uniform_(-bound, bound, generator=gen))
    return tuple(out)


class VeRAProjections:
    """The frozen ``vera_A`` and ``vera_B`` one rule's modules share.

    A plain object, not a module: the projections are not the base's tensors
    nor trained ones, so they stay out of the state dict, the base fingerprint
    and ``named_buffers``. They follow the input's device at the first forward
    there (:meth:`on`), once for all modules that share them."""

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor):
        self.vera_A, self.vera_B = vera_a, vera_b

    def on(self, device: torch.device) -> "VeRAProjections":
        if self.vera_A.device != device:
            self.vera_A, self.vera_B = self.vera_A.to(device), self.vera_B.to(device)
        return self


class VeRALinear(nn.Module):
    """``W + Λ_b·B·Λ_d·A`` beside a frozen ``nn.Linear`` or ``Conv1D``."""

    def __init__(self, base: nn.Module, opts: VeRAOptions, projections: VeRAProjections,
                 owner: bool, kind: str | None = None):
        # Attributes straight into __dict__, parameters into _parameters: nn.Module's
        # __init__ and __setattr__ cost microseconds a call, thousands of times.
        init_module(self)  # = super().__init__()
        kind = kind or _kind(base)
        w = base.weight
        n_in, n_out = (w.shape[1], w.shape[0]) if kind == "linear" else w.shape
        # projections: shared, the same object in every VeRA module of the rule
        # (deepcopy keeps that)
        vars(self).update(kind=kind, in_features=n_in, out_features=n_out,
                          dropout=opts.dropout, projections=projections,
                          stores_projections=owner and opts.save_projection)
        if kind == "conv1d":
            vars(self)["nf"] = base.nf
        self._parameters.update(
            weight=w, bias=base.bias,  # the base's own Parameter objects (bias may be None)
            vera_lambda_b=parameter(w.new_zeros(n_out)),
            vera_lambda_d=parameter(w.new_full((opts.r,), float(opts.d_initial))))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        p = self._parameters  # not self.vera_lambda_b: nn.Module.__getattr__ is slow
        return {"vera_lambda_b": p["vera_lambda_b"], "vera_lambda_d": p["vera_lambda_d"]}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The vectors, and (first module of the rule, ``save_projection``) the projections."""
        out = dict(self.adapter_params())
        if self.stores_projections:
            out.update(vera_A=self.projections.vera_A, vera_B=self.projections.vera_B)
        return out

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.adapter_params().items():
            p.copy_(tensors[name])
        if self.stores_projections:  # written into the shared buffers: every module sees them
            self.projections.vera_A.copy_(tensors["vera_A"])
            self.projections.vera_B.copy_(tensors["vera_B"])

    _base = base_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x, self._base(x))

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted output given the base output ``out``, which it may overwrite
        (the forward's fresh base output; per-row batches pass a copy)."""
        p = self._parameters  # not self.vera_lambda_d: nn.Module.__getattr__ is slow
        lambda_b, lambda_d = p["vera_lambda_b"], p["vera_lambda_d"]
        proj = self.projections.on(x.device)
        a = proj.vera_A[:, :self.in_features].to(lambda_d.dtype)
        b = proj.vera_B[:self.out_features, :].to(lambda_d.dtype)
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        if torch.is_grad_enabled() and (lambda_b.requires_grad or lambda_d.requires_grad
                                        or x.requires_grad or out.requires_grad):
            return out + lambda_b * F.linear(lambda_d * F.linear(h, a), b)
        # Inference: the same operations in the same order, so the same bits, but the
        # scalings and the sum in place where no type promotion or broadcasting is
        # involved: one output-sized temporary instead of three. (Autograd would need
        # the unscaled intermediates, hence the branch above.)
        t = F.linear(h, a)
        t = t.mul_(lambda_d) if t.dtype == lambda_d.dtype else lambda_d * t
        u = F.linear(t, b)
        u = u.mul_(lambda_b) if u.dtype == lambda_b.dtype else lambda_b * u
        if u.dtype != out.dtype or u.shape != out.shape:
            return out + u
        return out.add_(u)

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        """``ΔW`` as an (out, in) matrix in ``dtype``."""
        proj = self.projections.on(self.weight.device)
        a = proj.vera_A[:, :self.in_features].to(dtype)
        b = proj.vera_B[:self.out_features, :].to(dtype)
        return (self.vera_lambda_b.to(dtype).unsqueeze(-1) * b) @ \
            (self.vera_lambda_d.to(dtype).unsqueeze(-1) * a)

    @torch.no_grad()
    def merge_into(self, original: nn.Module) -> None:
        w = original.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        d = self.delta(dt)
        w.copy_((w.to(dt) + (d.t() if self.kind == "conv1d" else d)).to(w.dtype))

    def extra_repr(self) -> str:
        return (f"{self.kind}, in={self.in_features}, out={self.out_features}, "
                f"r={self.vera_lambda_d.shape[0]}")


class VeRA(Method):
    name = "vera"
    family = "reparameterize"
    Options = VeRAOptions
    summary = "shared frozen random projections, trained scaling vectors (VeRA); Linear, Conv1D"
    unchanged_at_apply = True  # vera_lambda_b = 0

    def __init__(self):
        self._pending: dict[int, tuple[VeRAProjections, bool]] = {}

    def check(self, module, step):
        return None if _kind(module) else "VeRA adapts Linear and GPT-2 Conv1D modules only"

    def count_params(self, module, step):
        return linear_dims(module)[1] + step.options.r

    def prepare(self, modules, steps):
        """Draw the rule's projections, sized to its largest module, once for all."""
        self._pending.clear()  # left by an apply that failed half-way: stale
        dims = [linear_dims(modules[s.target]) for s in steps]
        opts = steps[0].options
        a, b = draw_projections(opts.r, max(i for i, _ in dims), max(o for _, o in dims),
                                opts.seed)
        w = modules[steps[0].target].weight
        shared = VeRAProjections(a.to(device=w.device, dtype=w.dtype),
                                 b.to(device=w.device, dtype=w.dtype))
        for i, s in enumerate(steps):
            self._pending[id(s)] = (shared, i == 0)

    def apply(self, module, step):
        shared, owner = self._pending.pop(id(step))
        return VeRALinear(module, step.options, shared, owner)

    def merge(self, installed, original):
        installed.merge_into(original)
        return original

@hookimpl
def register_methods(register):
    register(VeRA())
