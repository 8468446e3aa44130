"""HF PEFT's format: IA3Config; HF stores the vector as (out, 1), or (1, in) for."""

from __future__ import annotations

import re

from peftspec.plugin_api import HFPeftCodec


class IA3Codec(HFPeftCodec):
    method = "ia3"
    # feedforward modules, and lists feedforward_modules as a subset of target_modules
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
