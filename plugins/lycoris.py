"""What LoHa and LoKr (the LyCORIS family) share; not a plugin itself.

Both replace an ``nn.Linear`` by a module that adds a dense update
``ΔW = f(factors)·alpha/r`` to the frozen weight, both merge by adding
``ΔW``, and both map to HF PEFT's ``LycorisConfig`` (``r``, ``alpha``,
``rank_pattern``, ``alpha_pattern``, ``rank_dropout``, ``module_dropout``).
This module holds that common part: :class:`DeltaLinear` (forward, per-row
``adapt``, merge), the Linear-only check, HF PEFT's Kaiming init, and the
export/import of several rules of one method as one config with
rank/alpha patterns. Uses only peftspec's public plugin API.

HF PEFT's LoHa and LoKr adapt ``nn.Linear`` (and convolutions) but not
transformers' ``Conv1D`` (GPT-2's attention and MLP), so neither do these:
an adapter peftspec writes is one HF PEFT can load.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import init_module, parameter


def linear_only(module: nn.Module, method: str) -> str | None:
    """``check``: why ``module`` cannot take ``method`` (``None`` if it can)."""
    if isinstance(module, nn.Linear):
        return None
    if type(module).__name__ == "Conv1D":
        return (f"{method} adapts nn.Linear only; GPT-2's Conv1D is not supported (HF PEFT's "
                f"{method} does not adapt it either); use lora or vera there")
    return f"{method} adapts nn.Linear modules only"


@lru_cache(maxsize=None)
def _bound(fan_in: int) -> float:
    gain = math.sqrt(2.0 / (1 + 5))
    return math.sqrt(3.0) * gain / math.sqrt(fan_in)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(t, a=sqrt(5))`` (HF PEFT's init), without its checks
    (the bound is computed once per fan-in: a deep model asks for a few, thousands of times)."""
    bound = _bound(t.shape[1])
    return t.uniform_(-bound, bound)


class DeltaLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a dense update ``self.delta()`` (out, in).

    Keeps the base's ``weight`` and ``bias`` objects under their names. The
    forward folds the update into the weight for one GEMM, ``x·(W + ΔW)ᵀ + b``,
    where HF PEFT runs two (``x·Wᵀ + b + x·ΔWᵀ``): the same function, cheaper
    for any batch of more than a few tokens; with ``ΔW = 0`` at apply the
    weight is ``W`` bit for bit, so outputs are the base's exactly.
    Subclasses set ``scale`` and define ``delta()`` and ``adapter_params()``.
    """

    scale: float

    def __init__(self, base: nn.Linear, **params: torch.Tensor):
        """``params``: the subclass's adapter tensors (name -> initialised tensor),
        registered after ``weight`` and ``bias`` in this order.

        Attributes go straight into ``__dict__`` and parameters into ``_parameters``:
        ``nn.Module.__init__`` and ``__setattr__`` cost microseconds a call, and a spec
        adapting every projection of a deep model builds thousands of these."""
        init_module(self)  # = super().__init__()
        w = base.weight
        vars(self).update(out_features=w.shape[0], in_features=w.shape[1])
        # weight and bias are the base's own Parameter objects (bias may be None)
        self._parameters.update(weight=w, bias=base.bias,
                                **{k: parameter(t) for k, t in params.items()})

    def delta(self) -> torch.Tensor:  # pragma: no cover - subclasses define it
        """``ΔW`` (out, in), a fresh tensor (in-place steps where no gradient is wanted)."""
        raise NotImplementedError

    def grad_wanted(self) -> bool:
        """Whether autograd must see the update (else it is built in place, in fewer
        passes over out x in memory: inference, ``torch.no_grad``)."""
        return torch.is_grad_enabled() and any(
            p.requires_grad for p in self.adapter_params().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.delta().to(self.weight.dtype)
        # W + ΔW; in place on the fresh ΔW where autograd does not need it (equal bit for
        # bit: IEEE addition commutes)
        w = self.weight + d if self.grad_wanted() else d.add_(self.weight)
        return F.linear(x, w, self.bias)

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted output given the base output ``out`` (per-row batches)."""
        return out + F.linear(x, self.delta().to(self.weight.dtype))

    @torch.no_grad()
    def merge_into(self, original: nn.Linear) -> None:
        """``W += ΔW`` in float32 (float64 stays float64), one cast back."""
        w = original.weight
        dt = torch.promote_types(w.dtype, torch.float32)
        w.copy_((w.to(dt) + self.delta().to(dt)).to(w.dtype))


# --- HF PEFT's format -------------------------------------------------------------------

def _num(a):  # HF PEFT writes integral alphas as integers
    return int(a) if float(a).is_integer() else a


def export_rules(rules, ctx, *, peft_type: str, same: dict[str, str], names, config: dict):
    """Several rules of one LyCORIS method as one ``LycorisConfig``.

    ``same``: option -> HF field that must agree across rules (one value per
    config); ``names(target, module)``: the peftspec tensor names of one target
    (HF PEFT's names are the same); ``config``: the method's other fields.
    """
    for key, hf in same.items():
        seen = {r.rule.where: getattr(r.options, key) for r in rules}
        if len(set(seen.values())) > 1:
            ctx.refuse(f"cannot export: {rules[0].rule.method} rules differ in '{key}' (" +
                       ", ".join(f"{w}: {v}" for w, v in seen.items()) + f"); HF PEFT's "
                       f"{peft_type} config has one {hf} for all modules")
    first = rules[0].options
    ranks, alphas, tensors = {}, {}, {}
    for rule in rules:
        for target in rule.targets:
            ranks[target], alphas[target] = rule.options.r, rule.options.alpha
            for name in names(target, rule):
                tensors[ctx.key(f"{target}.{name}")] = rule.tensor(f"{target}.{name}")
    full = {"r": first.r, "alpha": _num(first.alpha), "target_modules": ctx.target_modules(ranks),
            "rank_pattern": ctx.pattern(ranks, first.r),
            "alpha_pattern": {k: _num(v) for k, v in ctx.pattern(alphas, first.alpha).items()},
            "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True,
            "use_effective_conv2d": False, "exclude_modules": None,
            "layers_to_transform": None, "layers_pattern": None, **config}
    return ctx.part(peft_type, full, tensors)


def import_rules(config: dict, ctx, *, method: str, require: dict, names, table: dict):
    """A ``LycorisConfig`` as rules: one per (r, alpha) group of targets.

    ``require``: fields peftspec cannot express unless at these values;
    ``names(target, module, r)``: the tensor names HF PEFT stores for a target;
    ``table``: the method's other rule keys, the same for every rule.
    """
    # init_weights only decides the initial values; the file's tensors replace them
    ctx.require({"rank_dropout": (0, 0.0), "module_dropout": (0, 0.0),
                 "init_weights": (True, False, "lycoris"), **require})
    if config.get("target_modules") is None:
        ctx.refuse("cannot import: target_modules is null in adapter_config.json")
    r, alpha = ctx.get("r", "int", 8), ctx.get("alpha", "number", 8)
    rp = ctx.get("rank_pattern", "number-dict", {}) or {}
    ap = ctx.get("alpha_pattern", "number-dict", {}) or {}
    targets = ctx.targets()
    if not targets:
        ctx.refuse(f"cannot import: target_modules {config['target_modules']!r} matches no "
                   "module of this model")
    groups: dict[tuple, list[str]] = {}
    keys: dict[tuple, dict[str, None]] = {}
    tensors = {}
    for t in targets:
        module = ctx.modules[t]
        if not isinstance(module, nn.Linear):
            ctx.refuse(f"cannot import: '{t}' is a {type(module).__name__}; peftspec's {method} "
                       "adapts nn.Linear only")
        rk, ak = ctx.pattern_key(rp, t), ctx.pattern_key(ap, t)
        group = (int(r if rk is None else rp[rk]), alpha if ak is None else ap[ak])
        groups.setdefault(group, []).append(t)
        for k in (rk, ak):
            if k is not None:
                keys.setdefault(group, {})[k] = None
        for name in names(t, module, group[0]):
            tensors[f"{t}.{name}"] = (ctx.key(f"{t}.{name}"), None)
    default = (r, alpha)
    rules = []
    for group in sorted(groups, key=lambda g: g != default):
        cands = ctx.base_candidates() if group == default else \
            [([ctx.pattern_selector(k) for k in keys.get(group, ())], [])]
        modules, exclude = ctx.selectors(groups[group], cands)
        rule = {"method": method, "modules": modules}
        if exclude:
            rule["exclude"] = exclude
        rule.update(r=group[0], alpha=group[1], **table)
        note = None if group == default else "from rank_pattern / alpha_pattern: " + \
            ", ".join(repr(k) for k in keys.get(group, ()))
        rules.append(ctx.rule("reparameterize", rule, note))
    return ctx.imported(rules, tensors)
