"""What the codecs of LoHa and LoKr (the LyCORIS family) share: several rules of one
method as one HF PEFT ``LycorisConfig`` (``r``, ``alpha``, ``rank_pattern``,
``alpha_pattern``, ``rank_dropout``, ``module_dropout``), and back."""

from __future__ import annotations

from torch import nn


def num(a):
    """``a`` as HF PEFT writes it: an integral alpha as an integer."""
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
    full = {"r": first.r, "alpha": num(first.alpha), "target_modules": ctx.target_modules(ranks),
            "rank_pattern": ctx.pattern(ranks, first.r),
            "alpha_pattern": {k: num(v) for k, v in ctx.pattern(alphas, first.alpha).items()},
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
