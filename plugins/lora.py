"""LoRA, rsLoRA and DoRA for ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Embedding``.

The update is ``W + s·B·A`` with ``s = alpha/r`` (``alpha/sqrt(r)`` with
``rslora``). ``B`` starts at zero, so the model's outputs are unchanged at
apply. With ``dora``, a magnitude vector ``m`` (one entry per output row,
initialised to the row norms of ``W``) rescales the adapted weight:
``W' = m · (W + s·B·A) / ||W + s·B·A||``, the norm detached from the graph as
the DoRA paper recommends.

The patched module keeps the original ``weight`` and ``bias`` parameters as
the same objects under the same names, so the base model's state-dict keys do
not change; the new tensors appear beside them as ``lora_A``, ``lora_B`` and
``lora_magnitude``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import Method, hookimpl, option, selectors
from peftspec.plugin_api import init_module
from peftspec.plugin_api import dequantized, install_weight

from . import lora_eva, lora_eva_apply, lora_init
from .base_layer import base_output


@dataclass(frozen=True)
class LoRAOptions:
    modules: tuple[str, ...] = selectors(doc="modules to adapt: Linear, Conv1D or Embedding")
    r: int = option(8, doc="rank of the update", min=1)
    alpha: float = option(8.0, doc="scale numerator: s = alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = option(0.0, doc="dropout on the adapter's input", min=0.0, max=0.999)
    rslora: bool = option(False, doc="rank-stabilised scaling alpha/sqrt(r)")
    dora: bool = option(False, doc="weight-decomposed LoRA: learn a per-row magnitude")
    init: Literal["zeros", "gaussian", "pissa", "olora", "eva"] = option(
        "zeros", doc="B = 0 with A Kaiming-uniform ('zeros') or A ~ N(0, 1/r) ('gaussian'); "
                     "'pissa' / 'olora' start from the weight's SVD / QR and rewrite the base "
                     "weight to the residual (plugins/lora_init.py); 'eva': A from the SVD of "
                     "each layer's inputs over the training data, computed before the first "
                     "step (plugins/lora_eva.py)")
    niter: int = option(0, doc="PiSSA: 0 for the exact SVD, N > 0 for torch.svd_lowrank with "
                               "N subspace iterations (HF PEFT's pissa_niter_N)", min=0)
    eva_rho: float = option(2.0, doc="EVA: a layer may get up to round(r*rho) of the rules' "
                                     "rank budget (1.0: every layer keeps r)", min=1.0)
    eva_tau: float = option(0.99, doc="EVA: the cosine similarity of a layer's components "
                                      "between passes at which it has converged",
                            min=0.0, max=1.0)
    eva_whiten: bool = option(False, doc="EVA: divide A's rows by sqrt of their singular value")
    eva_adjust_scaling: bool = option(True, doc="EVA: scale alpha by new_r/r where the rank "
                                                "moved (HF PEFT's adjust_scaling_factors)")
    eva_label_mask: bool = option(True, doc="EVA: skip positions whose label is -100")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def module_kind(module: nn.Module) -> str | None:
    """What LoRA sees in ``module``: ``"linear"``, ``"embedding"``, ``"conv1d"``
    (transformers' GPT-2 ``Conv1D``, which stores its weight as (in, out)), or ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2 and hasattr(module, "nf"):
        return "conv1d"
    return None


def linear_dims(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) of the linear map; for embeddings (num_embeddings, dim)."""
    w = module._parameters["weight"]  # not module.weight: nn.Module.__getattr__ is slow
    if kind == "linear":
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]  # conv1d stores (in, out); embedding (num, dim)


@lru_cache(maxsize=None)
def _kaiming_bound(fan_in: int) -> float:
    """The bound of ``nn.init.kaiming_uniform_(w, a=math.sqrt(5))`` for this fan-in,
    computed exactly as torch computes it (that call's checks cost more than the draw)."""
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


class LoRALinear(nn.Module):
    """LoRA beside a frozen ``nn.Linear`` or ``Conv1D`` (``fan_in_fan_out``)."""

    def __init__(self, base: nn.Module, kind: str, opts: LoRAOptions):
        init_module(self)  # = super().__init__(), at a quarter of the cost
        n_in, n_out = linear_dims(base, kind)
        # Plain attributes go straight into __dict__: nn.Module.__setattr__ costs
        # microseconds per call, which adds up when a spec patches thousands of modules.
        vars(self).update(kind=kind, in_features=n_in, out_features=n_out, r=opts.r,
                          scale=opts.scale, dropout=opts.dropout, dora=opts.dora)
        if kind == "conv1d":
            self.nf = base.nf
        w = base.weight
        a = w.new_empty((opts.r, n_in))  # initialised before it becomes a Parameter
        if opts.init == "gaussian":
            nn.init.normal_(a, std=1.0 / opts.r)
        else:  # = nn.init.kaiming_uniform_(a, a=math.sqrt(5)), HF PEFT's init, draw for draw
            bound = _kaiming_bound(n_in)
            a.uniform_(-bound, bound)
        # Registered in one go, for the same reason (each __setattr__ of a Parameter
        # runs a failing hasattr): names cannot clash on a fresh module. weight and
        # bias are the base's own Parameter objects; bias may be None, as in nn.Linear.
        self._parameters.update(weight=w, bias=base.bias, lora_A=nn.Parameter(a),
                                lora_B=nn.Parameter(w.new_zeros((n_out, opts.r))))
        if opts.dora:
            self.lora_magnitude = nn.Parameter(
                self._weight_norm(torch.zeros_like(self._weight_out_in())).detach())
        # PiSSA / OLoRA: A, B from the weight, the weight rewritten to the residual
        vars(self)["rewrite"] = lora_init.init_from_weight(self, opts.init, opts.niter) \
            if opts.init in lora_init.INITS else None

    def adapter_params(self) -> dict[str, nn.Parameter]:
        p = self._parameters  # not self.lora_A: nn.Module.__getattr__ costs, thousands of times
        out = {"lora_A": p["lora_A"], "lora_B": p["lora_B"]}
        if self.dora:
            out["lora_magnitude"] = p["lora_magnitude"]
        return out

    def param_roles(self) -> dict[str, str]:
        """LoRA+ trains ``B`` faster (``[train_config] loraplus_lr_ratio``)."""
        return {"lora_B": "B"}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """With PiSSA / OLoRA, also the initial factors the residual base came from."""
        out = self.adapter_params()
        if self.rewrite is not None:
            out.update(lora_A_init=self.rewrite.a0, lora_B_init=self.rewrite.b0)
        return out

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, p in self.adapter_params().items():
            p.copy_(tensors[key])
        if self.rewrite is not None:
            self.rewrite.set_factors(tensors["lora_A_init"], tensors["lora_B_init"])

    @property
    def rows_refusal(self) -> str | None:
        """Why per-row batches cannot run this module (its base weight is rewritten)."""
        if self.rewrite is None:
            return None
        return ("its init rewrote the base weight to a residual (PiSSA / OLoRA), which "
                "other rows of a per-row batch cannot share")

    def _weight_out_in(self) -> torch.Tensor:
        # A [[freeze]]-packed weight (nf4, int8...) comes back as a temporary dense
        # copy, never stored (peftspec.core.packed); a plain weight is itself.
        w = dequantized(self.weight)
        return w.t() if self.kind == "conv1d" else w

    def delta(self) -> torch.Tensor:
        """``s·B·A`` as an (out, in) matrix, computed in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def _weight_norm(self, delta: torch.Tensor) -> torch.Tensor:
        # In the weight's own dtype, exactly as forward() computes it, so that
        # m / ||W|| is exactly 1 at init and outputs are unchanged bit for bit.
        w = self._weight_out_in()
        return (w + delta.to(w.dtype)).norm(p=2, dim=1)

    _base = base_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dora or not x.is_contiguous():
            return self.adapt(x, self._base(x))
        # Plain LoRA, fused, on 2-D views: the GEMM adds s·(h·Aᵀ)·Bᵀ straight into
        # the base output (addmm_), with no (tokens × out) temporary and no separate
        # add pass. For a contiguous x the base call on the 2-D view is the very
        # kernel call the base module makes, so outputs stay bit-identical.
        x2 = x.view(-1, x.shape[-1])
        if self.kind == "conv1d":
            out = torch.addmm(self.bias, x2, self.weight)
        else:
            out = F.linear(x2, self.weight, self.bias)
        h = F.dropout(x2, self.dropout, self.training) if self.dropout else x2
        after_a = F.linear(h, self.lora_A)
        if out.dtype == self.lora_B.dtype:
            out.addmm_(after_a, self.lora_B.t(), alpha=self.scale)
        else:  # autocast: in-place ops are not cast, so let F.linear cast B
            out.add_(F.linear(after_a, self.lora_B), alpha=self.scale)
        return out.view(*x.shape[:-1], out.shape[-1])

    @property
    def add_rows(self):
        """Per-row batches: ``add_rows(x, out, idx)`` adds this adapter's update
        for rows ``idx`` of ``x`` into ``out`` in place (plain LoRA only; DoRA
        rescales the base output and goes through :meth:`adapt`)."""
        return None if self.dora else self._add_rows

    def _add_rows(self, x: torch.Tensor, out: torch.Tensor, idx: torch.Tensor) -> None:
        h = x.index_select(0, idx)
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B)
        out.index_add_(0, idx, delta, alpha=self.scale)

    @staticmethod
    def add_rows_batched(per_row: list, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Per-row batches with a (possibly) different adapter in every row, in two
        batched GEMMs: row ``i`` gets ``s_i·(x_i·A_iᵀ)·B_iᵀ`` added into ``out`` in
        place (``per_row[i]`` is that row's :class:`LoRALinear`, or None for the base).
        The cost is that of one adapter over the whole batch, whatever the mix.
        Returns False, having done nothing, where it does not apply (DoRA, ranks that
        differ, dropout while training, a dtype or layout it cannot add into)."""
        mods = list({id(m): m for m in per_row if m is not None}.values())
        if not mods or any(m.dora for m in mods) or len({m.r for m in mods}) != 1:
            return False
        if any(m.dropout and m.training for m in mods) or not out.is_contiguous():
            return False
        dtype = mods[0].lora_B.dtype
        if out.dtype != dtype or x.dtype != dtype or any(m.lora_B.dtype != dtype for m in mods):
            return False
        slot = {id(m): i for i, m in enumerate(mods)}
        a = torch.stack([m.lora_A for m in mods])                 # (G, r, in)
        b = torch.stack([m.lora_B * m.scale for m in mods])       # (G, out, r), scaled
        if any(m is None for m in per_row):
            a = torch.cat([a, a.new_zeros((1,) + a.shape[1:])])  # base rows: a zero update
            b = torch.cat([b, b.new_zeros((1,) + b.shape[1:])])
        index = torch.tensor([slot[id(m)] if m is not None else len(mods) for m in per_row],
                             device=x.device)
        n = x.shape[0]
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.index_select(0, index).transpose(1, 2))
        out.view(n, -1, out.shape[-1]).baddbmm_(h, b.index_select(0, index).transpose(1, 2))
        return True

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted output, given the base output ``out`` for ``x`` (which it
        may overwrite). Per-row batches compute the base once for all rows."""
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B)
        if not self.dora:
            return out.add_(lora, alpha=self.scale)
        # DoRA, as HF PEFT computes it: rescale the base output by m/||W + sBA||.
        w = self._weight_out_in()
        lora_w = self.lora_B @ self.lora_A
        norm = (w + self.scale * lora_w).norm(p=2, dim=1).detach()
        mag = self.lora_magnitude / norm
        base = out if self.bias is None else out - self.bias
        return out + (mag - 1) * base + mag * lora * self.scale

    def merged_weight(self) -> torch.Tensor:
        """The folded weight in the base's layout and dtype (math in float32)."""
        w = self._weight_out_in().float()
        new = w + self.delta()
        if self.dora:
            new = new * (self.lora_magnitude.float() / new.norm(p=2, dim=1)).unsqueeze(1)
        if self.kind == "conv1d":
            new = new.t()
        return new.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"{self.kind}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scale={self.scale:g}, dora={self.dora}")


class LoRAEmbedding(nn.Module):
    """LoRA beside a frozen ``nn.Embedding``: ``E + s·(B·A)ᵀ`` looked up by index."""

    def __init__(self, base: nn.Embedding, opts: LoRAOptions):
        super().__init__()
        self.weight = base.weight
        self.num_embeddings, self.embedding_dim = base.weight.shape
        for attr in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(base, attr))
        w = base.weight
        self.r = opts.r
        self.scale = opts.scale
        self.dropout = opts.dropout
        # As HF PEFT: A (r, num) starts at zero, B (dim, r) Gaussian; the update is zero.
        self.lora_A = nn.Parameter(torch.zeros(opts.r, self.num_embeddings, dtype=w.dtype,
                                               device=w.device))
        self.lora_B = nn.Parameter(torch.empty(self.embedding_dim, opts.r, dtype=w.dtype,
                                               device=w.device))
        with torch.no_grad():
            nn.init.normal_(self.lora_B)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def param_roles(self) -> dict[str, str]:
        """LoRA+ gives embedding LoRA its own learning rate (``loraplus_lr_embedding``)."""
        return {"lora_A": "embedding", "lora_B": "embedding"}

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x, self._lookup(x, self.weight))

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted output, given the base lookup ``out`` for ``x``."""
        after_a = self._lookup(x, self.lora_A.t())
        return out + (after_a @ self.lora_B.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B.float() @ self.lora_A.float()).t() * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"embedding, num={self.num_embeddings}, dim={self.embedding_dim}, r={self.r}, "
                f"scale={self.scale:g}")


class LoRA(Method):
    name = "lora"
    family = "reparameterize"
    Options = LoRAOptions
    summary = "low-rank update W + s·B·A (rsLoRA, DoRA); Linear, Conv1D, Embedding"
    mergeable = True
    unchanged_at_apply = True  # B starts at zero (A, for embeddings); DoRA's m = ||W||

    def check(self, module, step):
        kind = module_kind(module)
        if kind is None:
            return "LoRA adapts Linear, Conv1D and Embedding modules only"
        if kind == "embedding" and step.options.dora:
            return "DoRA is not supported on Embedding modules; use dora = false here"
        if step.options.init in lora_init.INITS + ("eva",) and \
                (kind == "embedding" or step.options.dora):
            return (f"init '{step.options.init}' works on Linear and Conv1D modules without "
                    "DoRA; use init = 'zeros' here")
        if step.options.init != "eva":
            moved = [k for k, v in lora_eva.OPTION_DEFAULTS.items()
                     if getattr(step.options, k) != v]
            if moved:
                return f"{moved[0]} is an EVA option: set init = 'eva' or leave it out"
        n_in, n_out = linear_dims(module, kind)
        if step.options.r > min(n_in, n_out):  # B·A has rank <= min(in, out) anyway
            return (f"r = {step.options.r} exceeds min(in, out) = {min(n_in, n_out)} of "
                    f"this {n_in}x{n_out} module; a larger rank only adds parameters")
        return None

    def count_params(self, module, step):
        kind = module_kind(module)
        n_in, n_out = linear_dims(module, kind)
        extra = n_out if step.options.dora else 0
        return step.options.r * (n_in + n_out) + extra

    def apply(self, module, step):
        kind = module_kind(module)
        if kind == "embedding":
            return LoRAEmbedding(module, step.options)
        return LoRALinear(module, kind, step.options)

    # PiSSA / OLoRA keep the original weight and put it back while the adapter is off
    def detach(self, installed, original, step):
        if getattr(installed, "rewrite", None) is not None:
            installed.rewrite.write_original()

    def attach(self, installed, original, step):
        if getattr(installed, "rewrite", None) is not None:
            installed.rewrite.write_residual()

    def release(self, installed, original, step):
        if getattr(installed, "rewrite", None) is not None:
            vars(installed)["rewrite"] = None  # merged or removed: the copy goes

    def base_note(self, options) -> str | None:
        return lora_init.BASE_NOTE if options.init in lora_init.INITS else None

    def unchanged_at_apply_with(self, options) -> bool:
        return options.init not in lora_init.INITS  # the residual + s·B₀A₀ rounds

    def init_from_data(self, model, steps, batches, report):
        """EVA (``init = "eva"``): A from the layers' inputs over ``batches``."""
        lora_eva_apply.init_from_data(model, steps, batches, report)

    def merge(self, installed, original):
        with torch.no_grad():  # a packed weight becomes a dense one: never requantized
            install_weight(original, installed.merged_weight())
        return original

    # --- HF PEFT's format: LoraConfig; rules of other r/alpha become rank/alpha_pattern ---
    hf_peft_types = ("LORA",)
    _HF_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
                 "lora_magnitude": "lora_magnitude_vector"}

    def to_hf_peft(self, rules, ctx):
        for key, hf in (("dropout", "lora_dropout"), ("rslora", "use_rslora"),
                        ("dora", "use_dora"), ("init", "init_lora_weights")):
            seen = {r.rule.where: getattr(r.options, key) for r in rules}
            if len(set(seen.values())) > 1:
                ctx.refuse(f"cannot export: lora rules differ in '{key}' (" + ", ".join(
                    f"{w}: {v}" for w, v in seen.items()) + f"); HF PEFT's LoraConfig has "
                    f"one {hf} for all modules")
        first = rules[0].options
        ranks, alphas, tensors, conv1d = {}, {}, {}, False
        for rule in rules:
            for target, cls in rule.targets.items():
                module = ctx.module(target)
                kind = module_kind(module) if module is not None else \
                    {"Embedding": "embedding", "Conv1D": "conv1d"}.get(cls, "linear")
                conv1d |= kind == "conv1d"
                ranks[target], alphas[target] = rule.options.r, rule.options.alpha
                names = dict(self._HF_NAMES)
                if kind == "embedding":
                    names.update(lora_A="lora_embedding_A", lora_B="lora_embedding_B")
                for ours in ("lora_A", "lora_B") + (("lora_magnitude",) if first.dora else ()):
                    tensors[ctx.key(f"{target}.{names[ours]}")] = rule.tensor(f"{target}.{ours}")
                if first.init in lora_init.INITS:  # back against the original base: rank 2r
                    a_key, b_key = (ctx.key(f"{target}.{names[k]}") for k in ("lora_A", "lora_B"))
                    tensors[a_key], tensors[b_key] = lora_init.hf_converted(
                        tensors[a_key], tensors[b_key], rule.tensor(f"{target}.lora_A_init"),
                        rule.tensor(f"{target}.lora_B_init"))
                    ranks[target] = 2 * rule.options.r
                    alphas[target] = rule.options.alpha * (math.sqrt(2) if first.rslora else 2)
        def num(a):  # HF PEFT writes integral alphas as integers
            return int(a) if float(a).is_integer() else a

        r0, alpha0 = first.r, first.alpha
        if first.init in lora_init.INITS:
            r0, alpha0 = 2 * r0, alpha0 * (math.sqrt(2) if first.rslora else 2)
        config = {"r": r0, "lora_alpha": num(alpha0),
                  "target_modules": ctx.target_modules(ranks),
                  "rank_pattern": ctx.pattern(ranks, r0),
                  "alpha_pattern": {k: num(v) for k, v in
                                    ctx.pattern(alphas, alpha0).items()},
                  "lora_dropout": first.dropout, "use_rslora": first.rslora,
                  "use_dora": first.dora, "fan_in_fan_out": conv1d,
                  "init_lora_weights": "gaussian" if first.init == "gaussian" else True,
                  "bias": "none", "exclude_modules": None, "layers_to_transform": None,
                  "layers_pattern": None}
        return ctx.part("LORA", config, tensors)

    def from_hf_peft(self, config, ctx):
        ctx.require({"bias": ("none",), "lora_bias": (False,), "use_qalora": (False,),
                     "layer_replication": (None,), "target_parameters": (None, []),
                     "trainable_token_indices": (None,), "alora_invocation_tokens": (None,),
                     "use_bdlora": (None, False), "megatron_config": (None,),
                     "init_lora_weights": (True, False, "gaussian", "eva")})
        if config.get("target_modules") is None:
            ctx.refuse("cannot import: target_modules is null in adapter_config.json")
        r, alpha = ctx.get("r", "int", 8), ctx.get("lora_alpha", "number", 8)
        rp, ap = ctx.get("rank_pattern", "number-dict", {}), ctx.get("alpha_pattern",
                                                                     "number-dict", {})
        for name, kind in (("lora_dropout", "number"), ("use_rslora", "bool"),
                           ("use_dora", "bool")):
            ctx.get(name, kind, 0.0 if kind == "number" else False)
        targets = ctx.targets()
        if not targets:
            ctx.refuse(f"cannot import: target_modules {config['target_modules']!r} matches no "
                       "module of this model")
        groups: dict[tuple, list[str]] = {}
        keys: dict[tuple, dict[str, None]] = {}
        tensors = {}
        for t in targets:
            rk, ak = ctx.pattern_key(rp, t), ctx.pattern_key(ap, t)
            group = (r if rk is None else rp[rk], alpha if ak is None else ap[ak])
            groups.setdefault(group, []).append(t)
            for k in (rk, ak):
                if k is not None:
                    keys.setdefault(group, {})[k] = None
            kind = module_kind(ctx.modules[t])
            if kind == "embedding" and config.get("use_dora"):
                ctx.refuse(f"cannot import: DoRA on the embedding '{t}'; peftspec's LoRA does "
                           "not support DoRA on Embedding modules")
            names = dict(self._HF_NAMES)
            if kind == "embedding":
                names.update(lora_A="lora_embedding_A", lora_B="lora_embedding_B")
            for ours in ("lora_A", "lora_B") + (("lora_magnitude",) if config.get("use_dora")
                                                else ()):
                tensors[f"{t}.{ours}"] = (ctx.key(f"{t}.{names[ours]}"), None)
        default = (r, alpha)
        base = ctx.base_candidates()
        chosen = {}
        for group in [g for g in groups if g != default]:
            sels = [ctx.pattern_selector(k) for k in keys.get(group, ())]
            cands = [([s], []) for s in sels] + [(sels, [])] + \
                [(sels, excl) for _, excl in base]
            chosen[group] = ctx.selectors(groups[group], cands)
        if default in groups:
            others = [s for g in chosen for s in chosen[g][0]]
            cands = list(base) + [(mods, excl + others) for mods, excl in base]
            chosen[default] = ctx.selectors(groups[default], cands)
        rules = []
        for group in sorted(groups, key=lambda g: g != default):
            modules, exclude = chosen[group]
            table = {"method": "lora", "modules": modules}
            if exclude:
                table["exclude"] = exclude
            table.update(r=group[0], alpha=group[1], dropout=config.get("lora_dropout", 0.0),
                         rslora=bool(config.get("use_rslora")), dora=bool(config.get("use_dora")))
            if config.get("init_lora_weights") == "gaussian":
                table["init"] = "gaussian"
            elif config.get("init_lora_weights") == "eva":  # ranks as EVA left them
                table.update(init="eva", eva_rho=1.0)
            note = None if group == default else "from rank_pattern / alpha_pattern: " + \
                ", ".join(repr(k) for k in keys.get(group, ()))
            rules.append(ctx.rule("reparameterize", table, note))
        return ctx.imported(rules, tensors)


@hookimpl
def register_methods(register):
    register(LoRA())
