"""What a codec's ``from_hf_peft`` sees when peftspec imports from HF PEFT.

A codec listing a ``peft_type`` in ``HFPeftCodec.peft_types`` gets that
config in ``HFPeftCodec.from_hf_peft(config, context)`` and returns
``context.imported(rules, tensors)``, an :class:`HFPeftImport`: the spec's
rules as :class:`ImportedRule` (TOML tables) and where each tensor of
peftspec's patched model comes from in HF PEFT's file. :class:`ImportContext`
type-checks config fields, applies HF PEFT's matching rules to the base's
modules, and finds peftspec selectors that pick exactly the same modules, so
plugins need not re-implement any of it. This is the plugin-facing half of
the import; :mod:`.importer` drives it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from peftspec.core.matching import class_names, parse_selector
from peftspec.formats.hf_peft.export_context import ExportContext
from peftspec.formats.hf_peft.folder import CONFIG_FILE, refuse
from peftspec.core.saferegex import UnsafePattern, escape
from peftspec.formats.hf_peft.matching import dotted_suffixes, hf_pattern_key, hf_selects


@dataclass
class ImportedRule:
    """A rule of the spec an import writes: its section and its TOML keys, in order."""

    family: str
    table: dict[str, Any]
    comment: str | None = None


@dataclass
class HFPeftImport:
    """What a codec's ``from_hf_peft`` returns.

    ``tensors`` maps each tensor peftspec's patched model holds (its adapter
    file name, e.g. ``model.layers.0.self_attn.q_proj.lora_A``) to the name of
    HF PEFT's tensor and a function converting it (``None``: as is); a
    converter raises ``ValueError`` with the reason when the tensor is wrong.
    """

    rules: list[ImportedRule]
    tensors: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]]


class ImportContext:
    """What ``from_hf_peft`` may use: the base ``model``, the HF file's tensor
    ``shapes``, and HF PEFT's matching rules over the model's module names."""

    def __init__(self, config: dict, model: nn.Module, shapes: dict[str, tuple[int, ...]]):
        self.config = config
        self.model = model
        self.shapes = shapes
        self.modules = {n: m for n, m in model.named_modules() if n}
        self._types = {n: class_names(m) for n, m in self.modules.items()}
        self._hit_cache: dict[str, frozenset[str]] = {}
        self.dropped: dict[str, str] = {}  # HF tensor -> the HF tensor it must equal

    refuse = staticmethod(refuse)
    key = staticmethod(ExportContext.key)

    @staticmethod
    def rule(family: str, table: dict[str, Any], comment: str | None = None) -> ImportedRule:
        return ImportedRule(family, dict(table), comment)

    @staticmethod
    def imported(rules: list[ImportedRule], tensors: dict) -> HFPeftImport:
        return HFPeftImport(list(rules), dict(tensors))

    def drop(self, name: str, equal_to: str) -> None:
        """Leave out HF PEFT's tensor ``name``, a copy of ``equal_to`` (a tied
        head's trainable tokens); the import refuses it if the two differ."""
        self.dropped[name] = equal_to

    def require(self, defaults: dict[str, tuple]) -> None:
        """Refuse config fields set to a value outside the accepted ones."""
        for name, accepted in defaults.items():
            value = self.config.get(name, accepted[0])
            if value not in accepted:
                refuse(f"cannot import: {CONFIG_FILE} sets {name} = {json.dumps(value)}, "
                        f"which peftspec cannot express (accepted: "
                        f"{', '.join(json.dumps(a) for a in accepted)})")

    _KINDS: dict[str, Callable[[Any], bool]] = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        and math.isfinite(v),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "null": lambda v: v is None,
        "str-list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "int-list": lambda v: isinstance(v, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v),
        "int-list-dict": lambda v: isinstance(v, dict) and all(
            isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                        for i in x) for x in v.values()),
        "number-dict": lambda v: isinstance(v, dict) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()),
    }

    def get(self, name: str, kinds: str, default: Any = None) -> Any:
        """``config[name]`` (``default`` when absent), refused unless one of
        ``kinds`` (``"int|null"``, ``"str|str-list"``, ``"number-dict"``...)."""
        value = self.config.get(name, default)
        if not any(self._KINDS[k](value) for k in kinds.split("|")):
            refuse(f"cannot import: {CONFIG_FILE} has {name} = {json.dumps(value)}; expected "
                    f"{kinds.replace('|', ' or ').replace('-', ' ')}")
        return value

    def targets(self) -> list[str]:
        """The modules HF PEFT adapts under this config, in model order."""
        for name, kinds in (("target_modules", "str|str-list|null"),
                            ("exclude_modules", "str|str-list|null"),
                            ("modules_to_save", "str-list|null"),
                            ("layers_to_transform", "int|int-list|null"),
                            ("layers_pattern", "str|str-list|null")):
            self.get(name, kinds)
        try:
            return [n for n in self.modules if hf_selects(self.config, n)]
        except UnsafePattern as exc:
            refuse(f"cannot import: a module pattern in {CONFIG_FILE} (target_modules, "
                    f"exclude_modules, layers_pattern or modules_to_save): {exc}")

    @staticmethod
    def pattern_key(patterns: dict | None, name: str) -> str | None:
        """The ``rank_pattern``-style key HF PEFT applies to module ``name``, if any."""
        return hf_pattern_key(patterns or {}, name)

    # selectors -------------------------------------------------------------------------

    def hits(self, selector: str) -> frozenset[str]:
        """The module names ``selector`` picks in the base model."""
        if selector not in self._hit_cache:
            sel = parse_selector(selector)
            self._hit_cache[selector] = frozenset(
                n for n in self.modules if sel.matches(n, self._types[n]))
        return self._hit_cache[selector]

    @staticmethod
    def name_selectors(names) -> list[str]:
        """HF PEFT's ``target_modules``-style value as selectors: a list entry
        ``q_proj`` picks ``q_proj`` and ``*.q_proj`` (``**.q_proj``); a string is
        a regular expression over the whole name (``re:``)."""
        if names is None:
            return []
        if isinstance(names, str):
            return [f"re:{names}"]
        return [f"**.{n}" if re.fullmatch(r"[\w.\-]+", n) else f"re:(.*\\.)?{escape(n)}"
                for n in sorted(names)]  # HF PEFT saves a set: its order means nothing

    @staticmethod
    def pattern_selector(key: str) -> str:
        """A ``rank_pattern`` key (HF matches ``(.*\\.)?(key)$``) as a selector."""
        if re.fullmatch(r"[\w\-]+(\.[\w\-]+)*", key):
            return f"**.{key}"
        return f"re:(.*\\.)?({key})"

    def base_candidates(self) -> list[tuple[list[str], list[str]]]:
        """(modules, exclude) candidates for the config's whole target set."""
        cfg = self.config
        targets = cfg.get("target_modules")
        exclude = self.name_selectors(cfg.get("exclude_modules"))
        layers = cfg.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        if not layers or isinstance(targets, str):
            return [(self.name_selectors(targets), exclude)]
        targets = sorted(targets)
        pattern = cfg.get("layers_pattern")
        if pattern:
            stacks = [pattern] if isinstance(pattern, str) else list(pattern)
        else:
            stacks = sorted({m.group(1) for n in self.targets()
                             if (m := re.match(r".*?\.([^.]*)\.\d+\.", n))})
        out = []
        globs = [f"**.{s}.{i}.**.{t}" for s in stacks for i in layers for t in targets]
        if len(globs) <= 12:
            out.append((globs, exclude))
        alt = "|".join
        out.append(([f"re:(.*\\.)?({alt(map(escape, stacks))})\\.({alt(map(str, layers))})"
                     f"\\.(.*\\.)?({alt(map(escape, targets))})"], exclude))
        return out

    def selectors(self, members: Iterable[str], candidates=(), *,
                  allow_exclude: bool = True) -> tuple[list[str], list[str]]:
        """``(modules, exclude)`` selectors picking exactly ``members``.

        Tries the ``(modules, exclude)`` candidates in order (dropping
        selectors that match nothing, which a spec may not have), then leaf
        names (``**.q_proj``), then the members' paths; returns the first that
        picks exactly the members.
        """
        members = list(members)
        want = set(members)
        leaves = list(dict.fromkeys(f"**.{n.rsplit('.', 1)[-1]}" for n in members))
        suffixes = list(dict.fromkeys(
            next((f"**.{s}" for s in dotted_suffixes(n) if self.hits(f"**.{s}") <= want), n)
            for n in members if re.fullmatch(r"[\w.\-]+", n)))
        candidates = list(candidates)
        ordered = [c for c in candidates if not c[1]] + [(leaves, [])] + \
            ([c for c in candidates if c[1]] if allow_exclude else []) + [(suffixes, [])]
        for modules, exclude in ordered:
            modules = [s for s in dict.fromkeys(modules) if self._ok(s) and self.hits(s)]
            picked = set().union(*(self.hits(s) for s in modules)) if modules else set()
            exclude = [s for s in dict.fromkeys(exclude)
                       if self._ok(s) and self.hits(s) & picked]
            gone = set().union(*(self.hits(s) for s in exclude)) if exclude else set()
            modules = [s for s in modules if self.hits(s) - gone]  # wholly excluded: drop
            picked = set().union(*(self.hits(s) for s in modules)) if modules else set()
            exclude = [s for s in exclude if self.hits(s) & picked]
            picked -= gone
            if modules and picked == want:
                return modules, exclude
        return [n if re.fullmatch(r"[\w.\-]+", n) else f"re:{escape(n)}"
                for n in members], []

    @staticmethod
    def _ok(selector: str) -> bool:
        try:
            parse_selector(selector)
        except ValueError:
            return False
        return True
