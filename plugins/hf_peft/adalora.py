"""HF PEFT's format: AdaLoraConfig; pruned triplets dropped, rank_pattern kept."""

from __future__ import annotations

import torch

from peftspec.plugin_api import HFPeftCodec, module_kind

from ..adalora import AdaLoRAOptions
from .lycoris import num


class AdaLoRACodec(HFPeftCodec):
    method = "adalora"
    peft_types = ("ADALORA",)
    _KEYS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
             "orth_reg_weight")

    def to_hf_peft(self, rules, ctx):
        first = rules[0].options
        for rule in rules[1:]:
            if {**vars(rule.options), "modules": ()} != {**vars(first), "modules": ()}:
                ctx.refuse(f"cannot export: adalora rules {rules[0].rule.where} and "
                           f"{rule.rule.where} differ in options; HF PEFT's AdaLoraConfig "
                           "has one set for all modules")
        tensors, pattern, conv1d, targets = {}, {}, False, []
        for rule in rules:
            for target, cls in rule.targets.items():
                module = ctx.module(target)
                conv1d |= (module_kind(module) if module is not None else cls) in ("conv1d", "Conv1D")
                targets.append(target)
                mask = rule.tensor(f"{target}.rank_mask").to(torch.bool)
                pattern[f"{target}.lora_E"] = mask.tolist()
                a, e, b = (rule.tensor(f"{target}.{n}") for n in ("lora_A", "lora_E", "lora_B"))
                if not bool(mask.all()):
                    a, e, b = a[mask], e[mask], b[:, mask]
                for name, t in (("lora_A", a), ("lora_E", e), ("lora_B", b)):
                    tensors[ctx.key(f"{target}.{name}")] = t.contiguous()
        pruned = any(not all(v) for v in pattern.values())
        config = {"peft_type": "ADALORA", "r": 8, "lora_alpha": num(first.alpha),
                  "target_modules": ctx.target_modules(targets), "lora_dropout": first.dropout,
                  "fan_in_fan_out": conv1d, "bias": "none", "init_lora_weights": True,
                  "use_rslora": False, "use_dora": False,
                  "rank_pattern": pattern if pruned else None, "alpha_pattern": {},
                  "total_step": first.total_step or 1 + first.tinit + first.tfinal,
                  "exclude_modules": None, "layers_to_transform": None,
                  "layers_pattern": None, **{k: getattr(first, k) for k in self._KEYS}}
        return ctx.part("ADALORA", config, tensors)

    def from_hf_peft(self, config, ctx):
        ctx.require({"bias": ("none",), "use_dora": (False,), "use_rslora": (False,),
                     "lora_bias": (False,), "layer_replication": (None,),
                     "target_parameters": (None, []), "trainable_token_indices": (None,),
                     "init_lora_weights": (True, False)})
        if config.get("target_modules") is None:
            ctx.refuse("cannot import: target_modules is null in adapter_config.json")
        init_r = ctx.get("init_r", "int", 12)
        if ctx.get("alpha_pattern", "number-dict", {}):
            ctx.refuse("cannot import: AdaLoRA with an alpha_pattern (peftspec's adalora has "
                       "one alpha per adapter)")
        pattern = config.get("rank_pattern") or {}
        if not isinstance(pattern, dict):
            ctx.refuse("cannot import: rank_pattern must be an object of lists of booleans")
        targets = ctx.targets()
        if not targets:
            ctx.refuse(f"cannot import: target_modules {config['target_modules']!r} matches no "
                       "module of this model")
        unknown = sorted(set(pattern) - {f"{t}.lora_E" for t in targets})
        if unknown:
            ctx.refuse(f"cannot import: rank_pattern names '{unknown[0]}', which is not the "
                       "lora_E of a targeted module")
        tensors = {}
        for t in targets:
            kind = module_kind(ctx.modules[t])
            if kind not in ("linear", "conv1d"):
                ctx.refuse(f"cannot import: AdaLoRA on '{t}' ({type(ctx.modules[t]).__name__});"
                           " peftspec's adalora adapts Linear and Conv1D modules only")
            keep = pattern.get(f"{t}.lora_E", [True] * init_r)
            if not (isinstance(keep, list) and len(keep) == init_r and
                    all(isinstance(x, bool) for x in keep)):
                ctx.refuse(f"cannot import: rank_pattern['{t}.lora_E'] must be {init_r} "
                           "booleans (init_r)")
            mask = torch.tensor(keep, dtype=torch.bool)
            for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                tensors[f"{t}.{name}"] = (ctx.key(f"{t}.{name}"), _scatter(mask, dim))
            tensors[f"{t}.rank_mask"] = (ctx.key(f"{t}.lora_E"), lambda _, m=mask: m.clone())
        modules, exclude = ctx.selectors(targets, ctx.base_candidates())
        table = {"method": "adalora", "modules": modules}
        if exclude:
            table["exclude"] = exclude
        table.update(init_r=init_r, alpha=ctx.get("lora_alpha", "number", 8),
                     dropout=ctx.get("lora_dropout", "number", 0.0))
        defaults = AdaLoRAOptions()
        for key in self._KEYS[1:]:
            value = ctx.get(key, "number", getattr(defaults, key))
            if value != getattr(defaults, key):
                table[key] = value
        total = config.get("total_step")
        if total is not None:
            table["total_step"] = ctx.get("total_step", "int", None)
        note = "pruned triplets (rank_pattern) come back as zeros" if pattern else None
        return ctx.imported([ctx.rule("reparameterize", table, note)], tensors)


def _scatter(mask: torch.Tensor, dim: int):
    """HF's pruned tensor (kept triplets only) back into ``init_r`` slots."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        kept = int(mask.sum())
        if t.dim() != 2 or t.shape[dim] not in (kept, mask.numel()):
            raise ValueError(f"shape {list(t.shape)} does not hold {kept} kept triplets "
                             "(rank_pattern)")
        if t.shape[dim] == mask.numel():
            return t
        shape = list(t.shape)
        shape[dim] = mask.numel()
        out = t.new_zeros(shape)
        if dim == 0:
            out[mask] = t
        else:
            out[:, mask] = t
        return out
    return convert
