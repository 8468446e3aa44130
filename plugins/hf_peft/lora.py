"""HF PEFT's format for LoRA: ``LoraConfig``; rules of other r / alpha become
``rank_pattern`` / ``alpha_pattern``."""

from __future__ import annotations

import math

from peftspec.plugin_api import HFPeftCodec, module_kind

from ..lora import init as lora_init


class LoRACodec(HFPeftCodec):
    method = "lora"
    peft_types = ("LORA",)
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
