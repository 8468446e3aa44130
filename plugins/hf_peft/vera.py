"""HF PEFT's format: VeraConfig; one rule (HF PEFT has one pair of projections."""

from __future__ import annotations

from peftspec.plugin_api import HFPeftCodec, is_linear_map


class VeRACodec(HFPeftCodec):
    method = "vera"
    # per adapter), the projections as base_model.vera_A / vera_B
    peft_types = ("VERA",)

    def to_hf_peft(self, rules, ctx):
        if len(rules) > 1:
            ctx.refuse("cannot export: " + ", ".join(r.rule.where for r in rules) + " are "
                       "several vera rules; HF PEFT's VeRA has one pair of projections for all "
                       "modules: write one rule")
        (rule,) = rules
        o = rule.options
        tensors, conv1d = {}, False
        targets = list(rule.targets)
        for t, cls in rule.targets.items():
            conv1d |= cls == "Conv1D"
            for n in ("vera_lambda_b", "vera_lambda_d"):
                tensors[ctx.key(f"{t}.{n}")] = rule.tensor(f"{t}.{n}")
        if o.save_projection:
            for n in ("vera_A", "vera_B"):
                tensors[f"base_model.{n}"] = rule.tensor(f"{targets[0]}.{n}")
        config = {"r": o.r, "target_modules": ctx.target_modules(targets),
                  "projection_prng_key": o.seed, "save_projection": o.save_projection,
                  "vera_dropout": o.dropout, "d_initial": o.d_initial, "fan_in_fan_out": conv1d,
                  "bias": "none", "init_weights": True, "layers_to_transform": None,
                  "layers_pattern": None}
        return ctx.part("VERA", config, tensors)

    def from_hf_peft(self, config, ctx):
        ctx.require({"bias": ("none",), "init_weights": (True, False)})
        targets = ctx.targets()
        if not targets:
            ctx.refuse(f"cannot import: target_modules {config.get('target_modules')!r} "
                       "matches no module of this model")
        for t in targets:
            if not is_linear_map(ctx.modules[t]):
                ctx.refuse(f"cannot import: '{t}' is a {type(ctx.modules[t]).__name__}; VeRA "
                           "adapts Linear and Conv1D modules only")
        save = ctx.get("save_projection", "bool", True)
        modules, exclude = ctx.selectors(targets, ctx.base_candidates())
        rule = {"method": self.method, "modules": modules}
        if exclude:
            rule["exclude"] = exclude
        rule.update(r=ctx.get("r", "int", 256), seed=ctx.get("projection_prng_key", "int", 0),
                    save_projection=save, dropout=ctx.get("vera_dropout", "number", 0.0),
                    d_initial=ctx.get("d_initial", "number", 0.1))
        tensors = {f"{t}.{n}": (ctx.key(f"{t}.{n}"), None) for t in targets
                   for n in ("vera_lambda_b", "vera_lambda_d")}
        if save:
            for n in ("vera_A", "vera_B"):
                tensors[f"{targets[0]}.{n}"] = (f"base_model.{n}", None)
        return ctx.imported([ctx.rule("reparameterize", rule)], tensors)
