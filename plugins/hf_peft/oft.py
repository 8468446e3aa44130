"""HF PEFT's format: OFTConfig (one for all modules); oft_R is HF's `oft_R.weight`."""

from __future__ import annotations

from torch import nn

from peftspec.plugin_api import HFPeftCodec


class OFTCodec(HFPeftCodec):
    method = "oft"
    peft_types = ("OFT",)
    _FIELDS = {"block_size": "oft_block_size", "r": "r", "block_share": "block_share",
               "cayley_neumann": "use_cayley_neumann", "neumann_terms": "num_cayley_neumann_terms"}

    def to_hf_peft(self, rules, ctx):
        for key, hf in self._FIELDS.items():
            seen = {r.rule.where: getattr(r.options, key) for r in rules}
            if len(set(seen.values())) > 1:
                ctx.refuse(f"cannot export: oft rules differ in '{key}' (" + ", ".join(
                    f"{w}: {v}" for w, v in seen.items()) + f"); HF PEFT's OFTConfig has one "
                    f"{hf} for all modules")
        o = rules[0].options
        targets, tensors = [], {}
        for rule in rules:
            for t in rule.targets:
                targets.append(t)
                tensors[ctx.key(f"{t}.oft_R.weight")] = rule.tensor(f"{t}.oft_R")
        config = {"target_modules": ctx.target_modules(targets), "exclude_modules": None,
                  "layers_to_transform": None, "layers_pattern": None,
                  **{hf: getattr(o, key) for key, hf in self._FIELDS.items()},
                  "module_dropout": 0.0, "coft": False, "eps": 6e-5, "fan_in_fan_out": False,
                  "bias": "none", "init_weights": True,
                  # HF PEFT warns about Cayley-Neumann adapters of peft < 0.18, whose
                  # series differed; this is the >= 0.18 form
                  "peft_version": "0.18.0"}
        return ctx.part("OFT", config, tensors)

    def from_hf_peft(self, config, ctx):
        ctx.require({"coft": (False,), "bias": ("none",), "module_dropout": (0, 0.0),
                     "init_weights": (True, False)})
        if "oft_block_size" not in config:
            ctx.refuse("cannot import: adapter_config.json has no oft_block_size: an OFT "
                       "adapter of peft < 0.14, whose format HF PEFT itself no longer reads")
        table = {"block_size": ctx.get("oft_block_size", "int", 32), "r": ctx.get("r", "int", 0),
                 "block_share": ctx.get("block_share", "bool", False),
                 "cayley_neumann": ctx.get("use_cayley_neumann", "bool", True),
                 "neumann_terms": ctx.get("num_cayley_neumann_terms", "int", 5)}
        if (table["r"] == 0) == (table["block_size"] == 0):
            ctx.refuse(f"cannot import: r = {table['r']} and oft_block_size = "
                       f"{table['block_size']}; HF PEFT needs exactly one of them non-zero")
        targets = ctx.targets()
        if not targets:
            ctx.refuse(f"cannot import: target_modules {config.get('target_modules')!r} "
                       "matches no module of this model")
        for t in targets:
            if not isinstance(ctx.modules[t], nn.Linear):
                ctx.refuse(f"cannot import: '{t}' is a {type(ctx.modules[t]).__name__}; "
                           "peftspec's OFT adapts nn.Linear only")
        modules, exclude = ctx.selectors(targets, ctx.base_candidates())
        rule = {"method": self.method, "modules": modules}
        if exclude:
            rule["exclude"] = exclude
        rule.update(table)
        tensors = {f"{t}.oft_R": (ctx.key(f"{t}.oft_R.weight"), None) for t in targets}
        return ctx.imported([ctx.rule("reparameterize", rule)], tensors)
