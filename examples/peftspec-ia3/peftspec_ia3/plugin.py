"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations.

Each targeted module gets a vector ``ia3_l``, initialised to ones. By default
it scales the module's output, ``y = (x Wᵀ + b) ⊙ l`` (one entry per output
feature); for modules also picked by ``feedforward`` it scales the input,
``y = (x ⊙ l) Wᵀ + b`` (one entry per input feature), as the paper does for
the second layer of each feed-forward block. The arithmetic, dtypes and merge
are HF PEFT's ``IA3`` tuner's, so the two agree value for value; only the
vector's shape differs (1-D here, ``(out, 1)`` / ``(1, in)`` there).

This module uses only peftspec's public plugin API; it is an example of what a
third party writes. The package's entry point makes it known::

    [project.entry-points.peftspec]
    ia3 = "peftspec_ia3.plugin"

peftspec ships the same method as its built-in ``ia3`` (``plugins/ia3.py``).
Two plugins may not register one name (the second is reported as a failed
plugin), so this example registers its method as ``ia3-example``; its HF PEFT
adapters (``peft_type`` IA3) import as the built-in ``ia3``, which computes the
same values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftspec import Method, Problem, hookimpl, selectors
from peftspec.plugin_api import HFPeftCodec


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


def _dims(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) of the module's linear map."""
    w = module.weight
    if kind == "linear":
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]  # Conv1D stores its weight as (in, out)


class IA3Linear(nn.Module):
    """A frozen ``nn.Linear`` or ``Conv1D`` whose output (or input) is rescaled.

    Keeps the base module's ``weight`` and ``bias`` parameters as the same
    objects under the same names, so the base state-dict keys are unchanged;
    the vector sits beside them as ``ia3_l``.
    """

    def __init__(self, base: nn.Module, kind: str, feedforward: bool):
        super().__init__()
        self.kind = kind
        self.feedforward = feedforward
        self.in_features, self.out_features = _dims(base, kind)
        if kind == "conv1d":
            self.nf = base.nf
        self.weight = base.weight
        self.bias = base.bias
        n = self.in_features if feedforward else self.out_features
        w = base.weight
        self.ia3_l = nn.Parameter(torch.ones(n, dtype=w.dtype, device=w.device))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"ia3_l": self.ia3_l}

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv1d":  # as transformers' Conv1D.forward, bit for bit
            size_out = x.size()[:-1] + (self.nf,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Multiplying by exactly 1.0 at init keeps outputs bit-identical.
        if self.feedforward:
            return self._base((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))
        out = self._base(x)
        return (out * self.ia3_l).to(out.dtype)

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
    name = "ia3-example"  # the built-in is "ia3"
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

    def count_params(self, module, step):
        n_in, n_out = _dims(module, _kind(module))
        return n_in if "feedforward" in step.roles else n_out

    def apply(self, module, step):
        return IA3Linear(module, _kind(module), feedforward="feedforward" in step.roles)

    def merge(self, installed, original):
        installed.merge_into(original)
        return original


class IA3Codec(HFPeftCodec):
    """HF PEFT's format, ``IA3Config``: HF stores the vector as (out, 1), or (1, in) for
    feedforward modules, and lists feedforward_modules as a subset of target_modules.
    A codec of its own, registered beside the method: the method knows nothing of
    HF PEFT."""

    method = "ia3-example"
    peft_types = ("IA3",)

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
        table = {"method": self.method, "modules": modules}
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
def register_hf_peft_codecs(register):
    register(IA3Codec())


@hookimpl
def check_plan(plan):
    """(IA)³ swaps in its own module holding the base weight, so it cannot sit
    on top of a reparameterization (LoRA) of the same module."""
    reparameterized = {s.target: s for s in plan.steps if s.family == "reparameterize"}
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
