"""Typed option schemas for method plugins.

A method declares its options as a frozen dataclass. Each field's type
annotation is the schema: ``int``, ``float``, ``bool``, ``str``,
``Literal[...]``, ``tuple[str, ...]``, unions of these, ``dict``. Fields made
with :func:`selectors` name modules (or parameters) of the model; the compiler
resolves them. Unknown keys are errors with a "did you mean".

Example::

    @dataclass(frozen=True)
    class LoRAOptions:
        modules: tuple[str, ...] = selectors(doc="modules to adapt")
        r: int = option(8, doc="rank", min=1)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin

from peftspec.core.errors import OptionError, Problem, did_you_mean

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, doc: str = "", min: float | None = None,
           max: float | None = None) -> Any:
    """A plain option; ``min``/``max`` bound numbers (inclusive)."""
    meta = {"doc": doc, "min": min, "max": max}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def selectors(*, kind: Literal["modules", "params"] = "modules", required: bool = True,
              doc: str = "") -> Any:
    """An option holding selectors that the compiler resolves against the model.

    ``kind="modules"`` matches dotted module names, ``kind="params"`` parameter
    names. A required selector option must be given and non-empty.
    """
    return dataclasses.field(default=(), metadata={"doc": doc, "selector": kind,
                                                   "required": required})


def named_key(error: object, keys, cls: type | None = None) -> str | None:
    """The option an error is about: an :class:`OptionError`'s ``key``, else the one
    key of ``keys`` (those the rule writes) that the message names as a word
    (``n = 100000 exceeds ...`` names ``n``); ``None`` when it names none or several.
    Selector keys of ``cls`` (``modules``, a common word in a reason) and the rule's
    own keys are not guessed from words, only taken from an ``OptionError``."""
    key = getattr(error, "key", None)
    if isinstance(error, OptionError) and key in keys:
        return key
    skip = {"method", "exclude", "optional"}
    if cls is not None and dataclasses.is_dataclass(cls):
        skip.update(f.name for f in selector_fields(cls))
    text = str(error)
    named = [k for k in keys if k not in skip and
             re.search(rf"(?<![\w.-]){re.escape(k)}(?![\w-])", text)]
    return named[0] if len(named) == 1 else None


def selector_fields(options_cls: type) -> list[dataclasses.Field]:
    """The fields of ``options_cls`` that hold selectors."""
    return [f for f in dataclasses.fields(options_cls) if "selector" in f.metadata]


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp) if a is not type(None))
    if origin in (tuple, list):
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        item = get_args(tp)[0]
        return f"a list of {plural.get(item, describe_type(item))}"
    if origin is dict or tp is dict:
        return "a table"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against ``tp``; return (ok, value converted for storage)."""
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        return (value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}), value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            ok, conv = _coerce(value, arg)
            if ok:
                return True, conv
        return False, value
    if tp is type(None):
        return value is None, value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        item = get_args(tp)[0]
        out = []
        for v in value:
            ok, conv = _coerce(v, item)
            if not ok:
                return False, value
            out.append(conv)
        return True, tuple(out)
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def build_options(cls: type, table: dict[str, Any], *, where: tuple,
                  locate, reserved: frozenset[str] = frozenset()) -> tuple[Any, list[Problem]]:
    """Validate ``table`` against the dataclass ``cls``.

    Args:
        cls: the method's options dataclass.
        table: the rule's keys, less the ones the compiler owns (``reserved``).
        where: key path of the rule, e.g. ``("reparameterize", 0)``.
        locate: ``locate(path, message, hint=None) -> Problem``.
        reserved: keys accepted by the compiler itself (offered in hints).

    Returns:
        The options instance (``None`` if there were problems) and the problems.
    """
    problems: list[Problem] = []
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = set(fields) | set(reserved)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in reserved:
            continue
        if key not in fields:
            problems.append(locate(where + (key,), f"unknown key '{key}'",
                                   did_you_mean(key, known) or
                                   f"known keys: {', '.join(sorted(known))}"))
            continue
        f = fields[key]
        tp = hints[key]
        ok, conv = _coerce(value, tp)
        if not ok:
            problems.append(locate(where + (key,),
                                   f"expected {describe_type(tp)}, got {value!r}"))
            continue
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(conv, (int, float)) and not isinstance(conv, bool):
            if lo is not None and conv < lo:
                problems.append(locate(where + (key,), f"must be at least {lo}, got {conv!r}"))
                continue
            if hi is not None and conv > hi:
                problems.append(locate(where + (key,), f"must be at most {hi}, got {conv!r}"))
                continue
        if "selector" in f.metadata and isinstance(conv, tuple):
            if any(not s for s in conv):
                problems.append(locate(where + (key,), "empty selector string"))
                continue
            if not conv and f.metadata.get("required"):  # as the docstring of selectors() says
                problems.append(locate(where + (key,), f"an empty list selects nothing; list "
                                                       f"{f.metadata['selector']} to adapt"))
                continue
        values[key] = conv
    for name, f in fields.items():
        missing = name not in values and not any(p.key and p.key.endswith(f".{name}")
                                                  for p in problems)
        if missing and f.default is _MISSING and f.default_factory is _MISSING:
            problems.append(locate(where, f"missing required key '{name}'"))
        elif missing and f.metadata.get("required") and "selector" in f.metadata:
            problems.append(locate(where, f"missing required key '{name}' "
                                          f"(a list of {f.metadata['selector']} selectors)"))
    if problems:
        return None, problems
    try:
        return cls(**values), []
    except (TypeError, ValueError) as exc:  # a __post_init__ cross-field check
        key = named_key(exc, table, cls)  # at the line of the key it names, if one
        return None, [locate(where + (key,) if key else where, str(exc))]


def options_problem(cls: Any) -> str | None:
    """Why ``cls`` cannot serve as a method's ``Options``, or ``None`` if it can.

    Checked when a plugin registers its method, so that a mistake is reported
    against the plugin's distribution at load time instead of surfacing later as
    a ``TypeError`` from :mod:`dataclasses` while a spec is checked.
    """
    if not isinstance(cls, type):
        return f"Options must be a class (a frozen dataclass), got {cls!r}"
    name = cls.__name__
    if not dataclasses.is_dataclass(cls):
        return f"Options class {name} is not a dataclass: decorate it with @dataclass(frozen=True)"
    if not cls.__dataclass_params__.frozen:
        return (f"Options class {name} is not frozen: use @dataclass(frozen=True) (one "
                "options object is shared by every step of a rule)")
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # noqa: BLE001 - a NameError from a string annotation, typically
        return f"the type annotations of Options class {name} cannot be resolved: {exc}"
    for f in dataclasses.fields(cls):
        if "selector" not in f.metadata:
            continue
        tp = hints.get(f.name)
        if get_origin(tp) not in (tuple, list) or get_args(tp)[:1] != (str,):
            return (f"selector option '{f.name}' of {name} must be annotated "
                    f"tuple[str, ...], not {tp!r}")
    return None
