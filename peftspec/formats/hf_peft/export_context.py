"""What a codec's ``to_hf_peft`` sees when peftspec exports to HF PEFT.

A method's rules reach its codec's ``HFPeftCodec.to_hf_peft(rules, context)`` as
:class:`ExportRule` (options, targets, the tensors of the adapter file); it
returns ``context.part(peft_type, config, tensors)``, an :class:`HFPeftPart`.
:class:`ExportContext` carries the base's module names and HF PEFT's matching
rules, so a plugin can write ``target_modules`` and ``rank_pattern`` values
that select exactly its targets without re-implementing them. This is the
plugin-facing half of the export; :mod:`.exporter` drives it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from peftspec.core.spec import Rule
from peftspec.formats.hf_peft.folder import PREFIX, refuse
from peftspec.core.saferegex import compile_pattern
from peftspec.formats.hf_peft.matching import dotted_suffixes, hf_pattern_key, hf_selects


@dataclass
class ExportRule:
    """One rule of the adapter's spec, as a codec's ``to_hf_peft`` sees it.

    Attributes:
        rule: the spec's rule (``rule.where`` names it in messages).
        options: its options, as compiled.
        targets: module path (parameter name for ``[[train]]``; ``""`` for a
            soft prompt) -> the base module's class name, in model order.
        roles: target -> the selector options that picked it (IA3's
            ``feedforward``).
        file_tensors: the adapter file's tensors, by peftspec's names (read them
            through :meth:`tensor`, which records what was exported).
        exported: the names :meth:`tensor` handed out; the exporter refuses a
            file whose tensors no rule exported.
    """

    rule: Rule
    options: Any
    targets: dict[str, str] = field(default_factory=dict)
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    file_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    exported: set[str] = field(default_factory=set, repr=False)

    def has_tensor(self, name: str) -> bool:
        """Whether the adapter file holds tensor ``name`` (e.g. to tell which of a
        method's optional tensors a target has when no ``--model`` is given)."""
        return name in self.file_tensors

    def tensor(self, name: str) -> torch.Tensor:
        """The adapter file's tensor ``name`` (peftspec's name); marks it exported."""
        if name not in self.file_tensors:
            refuse(f"the adapter file has no tensor '{name}', which {self.rule.where} "
                    f"({self.rule.method}) needs")
        self.exported.add(name)
        return self.file_tensors[name]


@dataclass
class HFPeftPart:
    """What a method's rules become: the config's fields and HF-named tensors."""

    peft_type: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class ExportContext:
    """What ``to_hf_peft`` may use besides its rules.

    ``model`` is the base model when the user gave one (``--model``), else
    ``None``; ``module_names`` are the base's module names either way (from
    the adapter file's fingerprint without a model).
    """

    def __init__(self, model: nn.Module | None, modules: dict[str, nn.Module],
                 module_names: list[str], base_model_name_or_path: str | None):
        self.model = model
        self.module_names = module_names
        self.base_model_name_or_path = base_model_name_or_path
        self._modules = modules

    refuse = staticmethod(refuse)

    @staticmethod
    def key(name: str) -> str:
        """HF PEFT's tensor name for peftspec's ``name`` (``base_model.model.`` + name)."""
        return PREFIX + name

    def module(self, path: str) -> nn.Module | None:
        """The base module at ``path`` (``None`` without a model)."""
        return self._modules.get(path)

    @staticmethod
    def part(peft_type: str, config: dict[str, Any],
             tensors: dict[str, torch.Tensor]) -> HFPeftPart:
        return HFPeftPart(peft_type, dict(config), dict(tensors))

    def shortest_suffixes(self, members: Iterable[str], ok: Callable[[str], bool]) -> list[str]:
        """For each member, its shortest dotted suffix ``s`` with ``ok(s)``
        (the full name when none is); de-duplicated, in order."""
        out: dict[str, None] = {}
        for name in members:
            pick = next((s for s in dotted_suffixes(name) if ok(s)), name)
            out.setdefault(pick)
        return list(out)

    def target_modules(self, targets: Iterable[str]) -> list[str]:
        """A ``target_modules`` list that selects exactly ``targets`` under HF
        PEFT's rule (a name equal to an entry or ending in ``.entry``): the
        shortest suffixes that pick no other module, e.g. ``["q_proj", "v_proj"]``."""
        targets = list(targets)
        want = set(targets)

        def ok(s: str) -> bool:
            return all(n in want for n in self.module_names if n == s or n.endswith("." + s))

        keys = self.shortest_suffixes(targets, ok)
        picked = {n for n in self.module_names if hf_selects({"target_modules": keys}, n)}
        return keys if picked == want else targets

    def pattern(self, values: dict[str, Any], default: Any) -> dict[str, Any]:
        """``rank_pattern``-style keys giving each module (of ``values``) its
        value, ``default`` elsewhere; the shortest suffixes that are unambiguous."""
        out: dict[str, Any] = {}
        for name, value in values.items():
            if value == default:
                continue

            def ok(s: str, value=value) -> bool:
                pat = compile_pattern(rf"(.*\.)?({s})$")
                return all(v == value for n, v in values.items() if pat.match(n))

            key = self.shortest_suffixes([name], ok)[0]
            out.setdefault(key, value)

        def check(pat: dict[str, Any]) -> bool:
            return all(pat.get(hf_pattern_key(pat, n), default) == v for n, v in values.items())

        if not check(out):
            out = {re.escape(n): v for n, v in values.items() if v != default}
        return out
