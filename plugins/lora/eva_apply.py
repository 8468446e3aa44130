"""EVA on an applied adapter: run :mod:`.eva` and put its result in place.

Where every layer keeps its rank, ``A`` is copied in and ``B`` zeroed. Where
ranks moved, the adapter is rebuilt from a rewritten spec (one rule per new
rank over exact module paths, alpha scaled, rank-0 layers dropped, the other
rules as written), so that the adapter file's embedded spec reproduces its
shapes on load and the HF PEFT export writes the ranks as ``rank_pattern``.
"""

from __future__ import annotations

import torch

from peftspec.plugin_api import (PeftspecError, apply_plan, compile_plan, parse_spec, remove,
                                 state_of, toml_loads, toml_value)

from . import eva as lora_eva

EVA_KEYS = ("eva_rho", "eva_tau", "eva_whiten", "eva_adjust_scaling", "eva_label_mask")


def init_from_data(model, steps, batches, report) -> dict[str, int]:
    """Initialise the ``init = "eva"`` steps of the active adapter from ``batches``;
    returns each layer's rank."""

    steps = [s for s in steps if s.options.init == "eva"]
    if not steps:
        return {}
    rules = {s.rule: s.options for s in steps}
    for key in EVA_KEYS[1:]:
        values = {w: getattr(o, key) for w, o in rules.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"rules with init = 'eva' differ in {key} ({values}); one EVA "
                             "computation covers the adapter: give them one value")
    first = steps[0].options
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    steps = sorted(steps, key=lambda s: order.get(s.target, 0))
    layers = lora_eva.layers_for((s.target, model.get_submodule(s.target), s.options.r,
                                  s.options.eva_rho) for s in steps)
    try:
        found = lora_eva.compute(model, layers, list(batches), tau=first.eva_tau,
                                 label_mask=first.eva_label_mask, whiten=first.eva_whiten,
                                 max_passes=1000, report=report or (lambda m: None))
    except lora_eva.EvaError as exc:
        raise ValueError(str(exc)) from None
    ranks = {n: a.shape[0] for n, a in found.items()}
    if any(ranks[s.target] != s.options.r for s in steps):
        _rebuild(model, state_of(model), steps, ranks)
    with torch.no_grad():
        for name, a in found.items():
            if a.shape[0] == 0:
                continue
            module = model.get_submodule(name)
            module.lora_A.copy_(a.to(module.lora_A.dtype))
            module.lora_B.zero_()
    return ranks


def _rebuild(model, state, steps, ranks: dict[str, int]) -> None:
    """Remove the adapter and apply it again from the spec with EVA's ranks."""

    spec = state.plan.spec
    name = state.active
    text = rewritten_spec(spec, steps, ranks)
    new = parse_spec(text, file=f"{spec.file or 'spec'} (EVA ranks)")
    remove(model, name)
    try:
        apply_plan(compile_plan(new, model), model, name=name, activate=True)
    except PeftspecError:  # pragma: no cover - the same spec with narrower rules
        apply_plan(compile_plan(spec, model), model, name=name, activate=True)
        raise


def rewritten_spec(spec, steps, ranks: dict[str, int]) -> str:
    """The spec's TOML with each EVA rule split by the ranks EVA gave its modules."""
    doc = toml_loads(spec.text)
    by_rule: dict[tuple[str, int], list] = {}
    for s in steps:  # s.rule is the rule's key path, e.g. "reparameterize[0]"
        family, _, index = s.rule.partition("[")
        by_rule.setdefault((family, int(index.rstrip("]"))), []).append(s)
    for family in list(doc):
        tables = doc[family]
        if not isinstance(tables, list):
            continue
        out = []
        for i, table in enumerate(tables):
            mine = by_rule.get((family, i))
            if not mine:
                out.append(table)
                continue
            r = mine[0].options.r
            groups: dict[int, list[str]] = {}
            for s in mine:
                groups.setdefault(ranks[s.target], []).append(s.target)
            for rank, targets in sorted(groups.items(), reverse=True):
                if rank == 0:
                    continue  # HF PEFT drops a layer EVA gives no rank
                new = {k: v for k, v in table.items() if k not in ("exclude", "optional")}
                new.update(modules=targets, r=rank, eva_rho=1.0)
                alpha = float(table.get("alpha", 8.0))
                if mine[0].options.eva_adjust_scaling and rank != r:
                    alpha *= rank / r
                new["alpha"] = alpha
                out.append(new)
        doc[family] = out
    lines = ["# EVA redistributed the ranks of the init = 'eva' rules: one rule per rank,",
             "# over the modules that got it (written by peftspec).", ""]
    for key, value in doc.items():
        tables = value if isinstance(value, list) else [value]
        for table in tables:
            if not isinstance(table, dict):
                raise PeftspecError(f"cannot rewrite the spec for EVA: top-level '{key}'")
            lines.append(f"[[{key}]]" if isinstance(value, list) else f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
            lines.append("")
    return "\n".join(lines)
