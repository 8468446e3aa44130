"""Loading a TOML spec into a typed :class:`Spec`.

The spec's sections are how the frozen base is stored, then the four PEFT
families:

* ``[[freeze]]``: storage of frozen weights (nf4, int8, bf16; float when absent);
* ``[[train]]``: selective training, original parameters made trainable;
* ``[[reparameterize]]``: LoRA and kin;
* ``[[augment]]``: new modules (adapters, IA3 vectors);
* ``[prefix]``: soft prompts (one table: a model takes one prompt).

Each rule names a ``method`` (``[[train]]`` defaults to ``select``) plus the
compiler's own keys ``exclude`` and ``optional``; every other key belongs to
the method's options and is validated against its schema. Every problem in the
file is collected and reported at once, each with file, line and key path.
No model and no torch computation is needed here.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from peftspec.core.errors import PluginError, Problem, SpecError, did_you_mean
from peftspec.core.options import build_options, describe_type, selector_fields
from peftspec.core.matching import parse_selector
from peftspec.core.tomlerrors import syntax_problem, unreadable_problem
from peftspec.core.untrusted import BadText, toml_loads
from peftspec.core.tomlpos import LineMap, format_path
from peftspec.core.train_config import OPTIONS as TRAIN_OPTIONS, check_value as check_train_value
from peftspec.core.registry import registry_or_default

SECTIONS = {"freeze": "freeze", "train": "train", "reparameterize": "reparameterize",
            "augment": "augment", "prefix": "prefix"}
TOP_LEVEL = ("spec", *SECTIONS, "train_config")
RULE_KEYS = frozenset({"method", "exclude", "optional"})
SPEC_KEYS = ("name", "description")
DEFAULT_METHOD = {"train": "select"}


@dataclass(frozen=True)
class Rule:
    """One rule of a spec: a method, its validated options, where it was written."""

    family: str
    index: int
    method: str
    options: Any
    exclude: tuple[str, ...]
    optional: bool
    line: int | None

    @property
    def where(self) -> str:
        """Key path of the rule, e.g. ``reparameterize[0]`` or ``prefix``."""
        return self.family if self.family == "prefix" else f"{self.family}[{self.index}]"


@dataclass(frozen=True)
class Spec:
    """A validated spec. ``text`` is the TOML source, saved with adapters."""

    name: str | None
    description: str | None
    rules: tuple[Rule, ...]
    text: str
    file: str | None = None
    # defaults for `peftspec train` (validated keys; see peftspec.core.train_config)
    train_config: dict = field(default_factory=dict, compare=False)

    def rules_of(self, family: str) -> list[Rule]:
        return [r for r in self.rules if r.family == family]


def load_spec(path: str | Path, registry=None) -> Spec:
    """Read and validate the spec at ``path``.

    Raises:
        SpecError: listing every problem found (file:line: key: message).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(Problem("no such file", file=str(path),
                                hint="check the path; example specs are in specs/")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(Problem(f"cannot read spec: {exc}", file=str(path))) from None
    return parse_spec(text, file=str(path), registry=registry)


def parse_spec(text: str, *, file: str | None = None, registry=None) -> Spec:
    """Validate TOML ``text`` as a spec; ``file`` is used in messages."""
    registry = registry_or_default(registry)
    try:
        doc = toml_loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(syntax_problem(text, exc, file)) from None
    except BadText as exc:  # nesting past the recursion limit, a 5,000-digit number
        raise SpecError(unreadable_problem(text, exc, file)) from None

    lines = LineMap(text)
    problems: list[Problem] = []

    def locate(path: tuple, message: str, hint: str | None = None, line: int | None = None):
        return Problem(message, file=file, line=line or lines.line_of(path),
                       key=format_path(path) or None, hint=hint)

    for key in doc:
        if key not in TOP_LEVEL:
            problems.append(locate((key,), f"unknown section '{key}'",
                                   did_you_mean(key, TOP_LEVEL) or
                                   f"sections are: {', '.join(TOP_LEVEL)}"))

    header = doc.get("spec", {})
    name = description = None
    if not isinstance(header, dict):
        problems.append(locate(("spec",), "must be a table: [spec]"))
    else:
        for key, value in header.items():
            if key not in SPEC_KEYS:
                problems.append(locate(("spec", key), f"unknown key '{key}'",
                                       did_you_mean(key, SPEC_KEYS) or "known: name, description"))
            elif not isinstance(value, str):
                problems.append(locate(("spec", key), f"expected a string, got {value!r}"))
        name, description = header.get("name"), header.get("description")
        name = name if isinstance(name, str) else None
        description = description if isinstance(description, str) else None

    train_config = _parse_train_config(doc.get("train_config", {}), locate, problems)

    rules: list[Rule] = []
    for family in SECTIONS:
        if family not in doc:
            continue
        raw = doc[family]
        if family == "prefix":
            if isinstance(raw, list):
                problems.append(locate((family,), "write [prefix] as one table, not [[prefix]]",
                                       "a model takes one soft prompt"))
                continue
            tables = [(raw, (family,))]
        else:
            if isinstance(raw, dict):
                problems.append(locate((family,), f"write [[{family}]] (an array of tables), "
                                                  f"not [{family}]"))
                continue
            if not isinstance(raw, list):
                problems.append(locate((family,), f"expected [[{family}]] tables"))
                continue
            tables = [(t, (family, i)) for i, t in enumerate(raw)]
        for index, (table, where) in enumerate(tables):
            if not isinstance(table, dict):
                problems.append(locate(where, "expected a table"))
                continue
            rule = _parse_rule(family, index, table, where, registry, locate, lines, problems)
            if rule is not None:
                rules.append(rule)

    if problems:
        raise SpecError(problems)
    return Spec(name=name, description=description, rules=tuple(rules), text=text, file=file,
                train_config=train_config)


def _parse_train_config(table, locate, problems) -> dict:
    """``[train_config]``: defaults for ``peftspec train``, passed through as a dict."""
    if not isinstance(table, dict):
        problems.append(locate(("train_config",), "must be a table: [train_config]"))
        return {}
    for key, value in table.items():
        if key not in TRAIN_OPTIONS:
            problems.append(locate(("train_config", key), f"unknown key '{key}'",
                                   did_you_mean(key, TRAIN_OPTIONS) or
                                   "see `peftspec train --help` for the options"))
            continue
        why = check_train_value(key, value)
        if why:
            problems.append(locate(("train_config", key), why))
    return dict(table)


def _parse_rule(family, index, table, where, registry, locate, lines, problems) -> Rule | None:
    before = len(problems)
    method_name = table.get("method", DEFAULT_METHOD.get(family))
    if method_name is None:
        known = ", ".join(registry.method_names(family)) or "none installed"
        problems.append(locate(where, "missing key 'method'", f"methods for {family}: {known}"))
        return None
    if not isinstance(method_name, str):
        problems.append(locate(where + ("method",), f"expected a string, got {method_name!r}"))
        return None
    info = registry.methods.get(method_name)
    if info is None:
        family_names = registry.method_names(family)
        hint = did_you_mean(method_name, family_names) or did_you_mean(method_name,
                                                                       registry.methods)
        if hint is None:
            hint = f"methods for [{family}]: {', '.join(family_names) or 'none installed'}"
        for empty in getattr(registry, "empty", ()):  # the likely cause, when there is one
            hint += f"; note: {empty}"
        problems.append(locate(where + ("method",), f"unknown method '{method_name}'", hint))
        return None
    method = info.method
    if method.family != family:
        problems.append(locate(where + ("method",),
                               f"method '{method_name}' belongs in [{_section(method.family)}], "
                               f"not [{_section(family)}]"))
        return None

    exclude = table.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(s, str) for s in exclude):
        problems.append(locate(where + ("exclude",), "expected a list of selector strings"))
        exclude = []
    optional = table.get("optional", False)
    if not isinstance(optional, bool):
        problems.append(locate(where + ("optional",), f"expected true or false, got {optional!r}"))

    try:
        options, option_problems = build_options(method.Options, table, where=where,
                                                 locate=locate, reserved=RULE_KEYS)
    except Exception as exc:  # noqa: BLE001 - the options class's own code failed
        raise PluginError(
            f"plugin {info.dist!r}, method {method_name!r} ({format_path(where)}, "
            f"{locate(where, '').file or '<spec>'}:{lines.line_of(where)}): its options class "
            f"{method.Options.__name__} failed: {type(exc).__name__}: {exc}. This is the "
            "plugin failing, not the spec being wrong (its __post_init__ should raise "
            "ValueError for a bad value)") from exc
    problems.extend(option_problems)

    # selector syntax can be checked without a model
    to_check = [("exclude", s) for s in exclude]
    if options is not None:
        for f in selector_fields(method.Options):
            to_check += [(f.name, s) for s in getattr(options, f.name)]
    for key, sel in to_check:
        try:
            parse_selector(sel)
        except ValueError as exc:
            problems.append(locate(where + (key,), str(exc),
                                   line=lines.line_of_item(where + (key,), sel)))
    if len(problems) > before:
        return None
    return Rule(family=family, index=index, method=method_name, options=options,
                exclude=tuple(exclude), optional=bool(optional), line=lines.line_of(where))


def _section(family: str) -> str:
    return family if family == "prefix" else f"[{family}]"


__all__ = ["Rule", "Spec", "load_spec", "parse_spec", "describe_type"]
