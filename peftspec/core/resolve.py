"""The compiler's selector phase: the names a rule's selectors pick, and for a
problem the spec line that holds the selector and a "did you mean" hint."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from torch import nn

from peftspec.core.errors import did_you_mean
from peftspec.core.matching import class_names, parse_selector
from peftspec.core.spec import Rule, Spec
from peftspec.core.tomlpos import LineMap


def by_leaf(names) -> dict[str, list[str]]:
    """Names grouped by their last dotted atom, in the given (model) order."""
    out: dict[str, list[str]] = {}
    for n in names:
        if n:
            out.setdefault(n.rpartition(".")[2], []).append(n)
    return out


class ModuleTypes:
    """Class names (:func:`class_names`) by module path and, for parameters, of the
    module that owns each; built on first use, as only ``type:`` selectors (and a
    near-miss hint) read them."""

    def __init__(self, modules: dict[str, nn.Module], params: dict[str, Any]):
        self._modules, self._params = modules, params

    @cached_property
    def modules(self) -> dict[str, frozenset[str]]:
        return {name: class_names(m) for name, m in self._modules.items()}

    @cached_property
    def params(self) -> dict[str, frozenset[str]]:
        mt = self.modules
        return {n: mt.get(n.rpartition(".")[0], frozenset()) for n in self._params}


def resolve_all(rule, key, selectors, kind, modules, types: ModuleTypes, params, problem,
                 leaves: dict | None = None) -> set[str]:
    """The names ``selectors`` pick. ``leaves``: a cache (by kind) of :func:`by_leaf`,
    shared across a compile: a ``**.name`` selector (nearly every selector) only
    tests the names ending in its last atom, not every module of a deep model."""
    found: set[str] = set()
    for text in selectors:
        sel = parse_selector(text)
        pool = params if kind == "params" else modules
        if sel.literal is not None and sel.literal[0] == "suffix" and leaves is not None:
            if kind not in leaves:
                leaves[kind] = by_leaf(pool)
            pool = leaves[kind].get(sel.literal[1].rpartition(".")[2], ())
        if sel.kind == "type":
            owners = types.params if kind == "params" else types.modules
            hits = [n for n in pool if n and sel.matches(n, owners[n])]
        else:  # globs and regular expressions read the name only
            hits = [n for n in pool if n and sel.matches(n)]
        if not hits and not rule.optional:
            pool = params if kind == "params" else modules
            problem(rule, f"selector '{text}' matched no {'parameter' if kind == 'params' else 'module'}",
                    key=key, hint=near_miss(text, pool, types.modules, kind),
                    item=text)
        found.update(hits)
    return found


def all_excluded(rule: Rule, matched: set[str], problem) -> None:
    """Report a rule whose selectors match only names its own ``exclude`` removes:
    the same error as a selector that matches nothing (the rule would do nothing),
    at the ``exclude`` list's line."""
    what = "parameter" if rule.family == "train" else "module"
    shown = ", ".join(f"'{n}'" for n in sorted(matched)[:3]) + (", ..." if len(matched) > 3 else "")
    problem(rule, f"every {what} this rule's selectors match ({len(matched)}: {shown}) is "
                  "removed by its own 'exclude'; the rule would change nothing",
            key="exclude", item=rule.exclude[0],
            hint="narrow 'exclude' or the selectors, or set 'optional = true' to allow an "
                 "empty rule")


def item_line(spec: Spec, rule: Rule, key: str, item: str) -> int | None:
    """The line that holds selector ``item`` of ``rule``'s ``key`` (the item's own
    line in a multi-line list), not the rule's first line; ``None`` when the spec
    text has no such key (a selector a preset expanded to). Only computed for a
    problem, so re-reading the text costs nothing on a good spec."""

    path = (rule.family,) if rule.family == "prefix" else (rule.family, rule.index)
    lines = LineMap(spec.text)
    if path + (key,) not in lines.lines:
        return None
    return lines.line_of_item(path + (key,), item)


def fix_segments(text: str, names) -> str | None:
    """``text`` with each misspelt literal segment replaced by the closest name
    segment of the model, if the result matches something (wildcards kept)."""
    import difflib

    atoms = sorted({a for n in names if n for a in n.split(".")})
    known = set(atoms)
    segments = text.split(".")
    changed = False
    for i, seg in enumerate(segments):
        if not seg or any(c in seg for c in "*?") or seg in known:
            continue
        close = difflib.get_close_matches(seg, atoms, n=1, cutoff=0.6)
        if not close:
            return None
        segments[i], changed = close[0], True
    if not changed:
        return None
    fixed = ".".join(segments)
    try:
        sel = parse_selector(fixed)
    except ValueError:
        return None
    return fixed if any(n and sel.matches(n) for n in names) else None


def near_miss(text: str, names, module_types, kind: str) -> str:
    """A hint in the selector's own form: ``**.v_prj`` gets ``did you mean
    '**.v_proj'?`` (a selector that matches), not the bare leaf name."""
    if text.startswith("type:"):
        types = sorted({t for ts in module_types.values() for t in ts
                        if t not in ("Module", "object")})
        close = did_you_mean(text[5:], types)
        return (f"did you mean 'type:{close.split(chr(39))[1]}'?" if close else
                f"module types here: {', '.join(types[:12])}")
    fixed = None if text.startswith("re:") else fix_segments(text, names)
    if fixed:
        return f"did you mean '{fixed}'?"
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    hint = did_you_mean(text.rsplit(".", 1)[-1], leaves)
    if hint:
        return hint
    sample = [n for n in names if n][:6]
    return (f"no {kind} name ends like that; `peftspec plan` lists names, e.g. "
            f"{', '.join(sample)}")
