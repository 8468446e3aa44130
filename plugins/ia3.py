"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations.

Each targeted module gets a vector ``ia3_l``, initialised to ones. By default
it scales the module's output, ``y = (x Wᵀ + b) ⊙ l`` (one entry per output
feature); for modules also picked by ``feedforward`` it scales the input,
``y = (x ⊙ l) Wᵀ + b`` (one entry per input feature), as the paper does for
the second layer of each feed-forward block. The arithmetic, dtypes and merge
are HF PEFT's ``IA3`` tuner's, so the two agree value for value; only the
vector's shape differs (1-D here, ``(out, 1)`` / ``(1, in)`` there), and the
HF PEFT format (``IA3Config``) is read and written both ways.

A built-in since issue 14; it began as the third-party example
``examples/peftspec-ia3``, which stays as that example and registers the same
code under the name ``ia3-example`` (two plugins may not register one name).
Like every built-in, this module uses only peftspec's public plugin API.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftspec.plugin_api import Method, Problem, hookimpl, module_kind, selectors
from peftspec.plugin_api import init_module, parameter

from .base_layer import base_output


@dataclass(frozen=True)
class IA3Options:
    modules: tuple[str, ...] = selectors(
        doc="modules whose output is rescaled: Linear or GPT-2 Conv1D")
    feedforward: tuple[str, ...] = selectors(
        required=False, doc="a subset of modules to rescale on the input side instead")


def _kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"conv1d"`` (GPT-2), the maps (IA)^3 scales; else ``None``."""
    kind = module_kind(module)
    return kind if kind in ("linear", "conv1d") else None


class IA3Linear(nn.Module):
    """A frozen ``nn.Linear`` or ``Conv1D`` whose output (or input) is rescaled.

    Keeps the base module's ``weight`` and ``bias`` parameters as the same
    objects under the same names, so the base state-dict keys are unchanged;
    the vector sits beside them as ``ia3_l``.
    """

    def __init__(self, base: nn.Module, kind: str, feedforward: bool):
        init_module(self)  # = super().__init__(), at a quarter of the cost
        own = base._parameters  # Linear and Conv1D keep both here (bias may be None)
        w = own["weight"]
        n0, n1 = w.shape
        n_in, n_out = (n1, n0) if kind == "linear" else (n0, n1)  # Conv1D: (in, out)
        # Plain attributes straight into __dict__ and parameters into _parameters, as
        # LoRALinear does: nn.Module.__setattr__ costs microseconds a call, and a spec
        # that adapts every projection of a deep model builds thousands of these.
        d = self.__dict__
        d["kind"], d["feedforward"], d["in_features"], d["out_features"] = \
            kind, feedforward, n_in, n_out
        if kind == "conv1d":
            d["nf"] = base.nf
        n = n_in if feedforward else n_out
        # w.new_ones: w's dtype and device without parsing them as arguments; a
        # tensor subclass (a packed frozen weight) is asked for them by name instead
        ones = w.new_ones(n) if type(w) is nn.Parameter else \
            torch.ones(n, dtype=w.dtype, device=w.device)
        # weight and bias are the base's own Parameter objects
        self._parameters.update(weight=w, bias=own.get("bias"), ia3_l=parameter(ones))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self._parameters["ia3_l"]}  # not self.ia3_l: __getattr__ is slow

    _base = base_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Multiplying by exactly 1.0 at init keeps outputs bit-identical.
        scale = self._parameters["ia3_l"]
        if self.feedforward:
            return self._base((x.to(scale.dtype) * scale).to(x.dtype))
        out = self._base(x)
        if out.dtype == scale.dtype and not (torch.is_grad_enabled() and (
                scale.requires_grad or out.requires_grad)):
            # Inference: rescale the fresh base output in place, the same products bit for
            # bit without a second output-sized tensor (and its pass over memory). With
            # autograd watching, the gradient of the vector needs the unscaled output.
            return out.mul_(scale)
        return (out * scale).to(out.dtype)

    @torch.no_grad()
    def merge_into(self, original: nn.Module) -> None:
        """Fold the vector into ``original``'s weight (and bias, for output
        scaling) in place; the math is done in float32 (float64 stays float64)."""
        w = original.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        l = self.ia3_l.to(dt)
        # The axis of the stored weight the vector runs along: Linear stores
        # (out, in), Conv1D (in, out).
        out_axis = 0 if self.kind == "linear" else 1
        axis = 1 - out_axis if self.feedforward else out_axis
        shape = [1, 1]
        shape[axis] = -1
        w.copy_((w.to(dt) * l.view(shape)).to(w.dtype))
        if not self.feedforward and original.bias is not None:
            b = original.bias
            b.copy_((b.to(dt) * l).to(b.dtype))

    def extra_repr(self) -> str:
        side = "input" if self.feedforward else "output"
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, scales={side}"


class IA3(Method):
    name = "ia3"
    family = "augment"
    Options = IA3Options
    summary = "(IA)^3: learned vectors rescale outputs (inputs for feedforward); Linear, Conv1D"
    unchanged_at_apply = True  # the vectors start at exactly 1.0

    def check(self, module, step):
        if "feedforward" in step.roles and "modules" not in step.roles:
            return ("it is listed under 'feedforward' but not under 'modules'; "
                    "feedforward must be a subset of modules")
        if _kind(module) is None:
            return "(IA)^3 adapts Linear and Conv1D modules only"
        return None

    def count_params(self, module, step):  # check() passed: a Linear or a Conv1D
        # (in, out) of the linear map, read off the weight itself: once per target
        n0, n1 = module._parameters["weight"].shape  # not module.weight: __getattr__
        if isinstance(module, nn.Linear):  # stored (out, in); Conv1D stores (in, out)
            n0, n1 = n1, n0
        return n0 if "feedforward" in step.roles else n1

    def apply(self, module, step):
        return IA3Linear(module, _kind(module), feedforward="feedforward" in step.roles)

    def merge(self, installed, original):
        installed.merge_into(original)
        return original

@hookimpl
def register_methods(register):
    register(IA3())


@hookimpl
def check_plan(plan):
    """(IA)³ swaps in its own module holding the base weight, so it cannot sit
    on top of a reparameterization (LoRA) of the same module."""
    reparameterized = {s.target: s for s in plan.steps if s.family == "reparameterize"}
    if not reparameterized:
        return []
    problems = []
    for step in plan.steps:
        other = reparameterized.get(step.target)
        if step.method == IA3.name and other is not None:
            problems.append(Problem(
                f"module '{step.target}' is reparameterized by '{other.method}' "
                f"({other.rule}, line {other.line}); ia3 cannot be combined with it",
                file=plan.spec.file, line=step.line, key=step.rule,
                hint="narrow one rule with 'exclude'"))
    return problems
