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

import re
from dataclasses import dataclass

import torch
from torch import nn

from peftspec.plugin_api import Method, Problem, hookimpl, selectors
from peftspec.plugin_api import init_module, parameter

from .base_layer import base_output


@dataclass(frozen=True)
class IA3Options:
    modules: tuple[str, ...] = selectors(
        doc="modules whose output is rescaled: Linear or GPT-2 Conv1D")
    feedforward: tuple[str, ...] = selectors(
        required=False, doc="a subset of modules to rescale on the input side instead")


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    # transformers' Conv1D (GPT-2), detected by shape rather than imported:
    # a plugin should not need transformers to load.
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2 and hasattr(module, "nf"):
        return "conv1d"
    return None


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
    mergeable = True
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

    # --- HF PEFT's format: IA3Config; HF stores the vector as (out, 1), or (1, in) for
    # feedforward modules, and lists feedforward_modules as a subset of target_modules
    hf_peft_types = ("IA3",)

    def to_hf_peft(self, rules, ctx):
        targets, ff, tensors, conv1d = [], [], {}, False
        for rule in rules:
            for t, cls in rule.targets.items():
                vec = rule.tensor(f"{t}.ia3_l")
                is_ff = "feedforward" in rule.roles[t]
                tensors[ctx.key(f"{t}.ia3_l")] = vec.reshape(1, -1) if is_ff else vec.reshape(-1, 1)
                targets.append(t)
                ff += [t] if is_ff else []
                conv1d |= cls == "Conv1D"
        names, tset, fset = ctx.module_names, set(targets), set(ff)

        def picks(s, pool, boundary=True):
            return [n for n in pool if n == s or n.endswith(("." if boundary else "") + s)]

        ff_keys = ctx.shortest_suffixes(ff, lambda s: set(picks(s, targets, False)) <= fset and
                                        set(picks(s, names)) <= tset)
        rest = ctx.shortest_suffixes([t for t in targets if t not in fset],
                                     lambda s: set(picks(s, names)) <= tset and
                                     not set(picks(s, targets, False)) & fset)
        keys = list(dict.fromkeys(rest + ff_keys))
        if {n for n in names if any(n == k or n.endswith("." + k) for k in keys)} != tset or \
                {t for t in targets if any(t.endswith(k) for k in ff_keys)} != fset:
            ctx.refuse("cannot export: no target_modules / feedforward_modules lists select "
                       "exactly these (IA)^3 modules under HF PEFT's suffix rules")
        return ctx.part("IA3", {"target_modules": keys, "feedforward_modules": ff_keys,
                                "fan_in_fan_out": conv1d, "exclude_modules": None,
                                "init_ia3_weights": True}, tensors)

    def from_hf_peft(self, config, ctx):
        targets = ctx.targets()
        if not targets:
            ctx.refuse(f"cannot import: target_modules {config.get('target_modules')!r} "
                       "matches no module of this model")
        spec_ff = config.get("feedforward_modules") or []
        ff = [t for t in targets if (re.fullmatch(spec_ff, t) if isinstance(spec_ff, str)
                                     else any(t.endswith(k) for k in spec_ff))]
        modules, exclude = ctx.selectors(targets, ctx.base_candidates())
        table = {"method": self.name, "modules": modules}
        if ff:
            table["feedforward"] = ctx.selectors(
                ff, [(ctx.name_selectors(spec_ff), [])], allow_exclude=False)[0]
        if exclude:
            table["exclude"] = exclude

        def vector(feedforward):
            def convert(t):
                want = "(1, in)" if feedforward else "(out, 1)"
                if t.dim() != 2 or t.shape[0 if feedforward else 1] != 1:
                    raise ValueError(f"has shape {list(t.shape)}; HF PEFT stores {want} for "
                                     f"{'a feedforward' if feedforward else 'this'} module")
                return t.reshape(-1)
            return convert

        tensors = {f"{t}.ia3_l": (ctx.key(f"{t}.ia3_l"), vector(t in ff)) for t in targets}
        return ctx.imported([ctx.rule("augment", table)], tensors)


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
