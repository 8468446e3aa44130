"""What a method's options are, in words and as JSON Schema.

A method's ``Options`` dataclass is the single source: :func:`describe_options`
turns each field (its annotation, default, ``min``/``max`` and ``doc`` from
:func:`peftspec.option` / :func:`peftspec.selectors`) into a record that
``peftspec plugins METHOD`` prints and ``--json`` carries; :func:`option_schema`
turns the same field into JSON Schema for ``peftspec schema``; and
:func:`example_rule` writes a TOML rule that the spec loader accepts. Nothing
here is maintained by hand per method, so third-party methods document
themselves the same way the built-ins do.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, get_args, get_origin

from peftspec.core.method import Method
from peftspec.core.options import describe_type

#: keys every rule takes besides its method's options (the compiler owns them)
RULE_KEYS_DOC = {
    "method": "the method plugin that applies this rule",
    "exclude": "selectors of targets to leave out",
    "optional": "tolerate selectors that match nothing",
}

_EXAMPLE_SELECTORS = {"modules": ["**.q_proj", "**.v_proj"], "params": ["**.bias"]}


def _default(f: dataclasses.Field) -> tuple[bool, Any]:
    if f.default is not dataclasses.MISSING:
        return True, f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return True, f.default_factory()  # type: ignore[misc]
    return False, None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def is_required(f: dataclasses.Field) -> bool:
    """As :func:`peftspec.core.options.build_options` decides it."""
    has_default, _ = _default(f)
    if "selector" in f.metadata:
        return bool(f.metadata.get("required"))
    return not has_default


def describe_options(method: Method) -> list[dict[str, Any]]:
    """One record per option: name, type (in words and as JSON Schema), whether it
    is required, default, bounds, doc, and for selectors their kind."""
    cls = method.Options
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        has_default, default = _default(f)
        kind = f.metadata.get("selector")
        required = is_required(f)
        out.append({
            "name": f.name,
            "type": (f"a list of {kind[:-1]} selectors" if kind else
                     "any TOML value (see doc)" if hints[f.name] is Any else
                     describe_type(hints[f.name])),
            "required": required,
            "default": None if required or not has_default else _jsonable(default),
            "min": f.metadata.get("min"),
            "max": f.metadata.get("max"),
            "doc": f.metadata.get("doc", ""),
            "selector": kind,
            "schema": option_schema(f, hints[f.name]),
        })
    return out


def type_schema(tp: Any) -> dict[str, Any]:
    """JSON Schema for a field annotation (what :func:`peftspec.core.options._coerce`
    accepts). ``None`` in a union is dropped: TOML has no null, a key is absent."""
    origin = get_origin(tp)
    if tp is Any:
        return {}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        parts = [type_schema(a) for a in get_args(tp) if a is not type(None)]
        if any(p == {} for p in parts):
            return {}
        return parts[0] if len(parts) == 1 else {"anyOf": parts}
    if origin in (tuple, list):
        return {"type": "array", "items": type_schema(get_args(tp)[0])}
    if tp is dict or origin is dict:
        return {"type": "object"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    return {}


def option_schema(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """JSON Schema of one option, with its doc, default and bounds (editors show them)."""
    kind = f.metadata.get("selector")
    if kind:
        schema: dict[str, Any] = {"type": "array", "items": {"type": "string", "minLength": 1}}
        if f.metadata.get("required"):
            schema["minItems"] = 1
        doc = f.metadata.get("doc", "")
        schema["description"] = (doc + "; " if doc else "") + f"{kind} selectors: glob " \
            "('**.q_proj'), 're:REGEX' or 'type:ClassName'"
        return schema
    schema = type_schema(tp)
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    numeric = schema.get("type") in ("integer", "number") or any(
        p.get("type") in ("integer", "number") for p in schema.get("anyOf", []))
    if numeric and (lo is not None or hi is not None):
        bounds = {k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None}
        if "anyOf" in schema:
            schema = {"anyOf": [{**p, **bounds} if p.get("type") in ("integer", "number")
                                else p for p in schema["anyOf"]]}
        else:
            schema.update(bounds)
    if f.metadata.get("doc"):
        schema["description"] = f.metadata["doc"]
    has_default, default = _default(f)
    if has_default and default is not None:
        schema["default"] = _jsonable(default)
    return schema


def section_header(family: str) -> str:
    return "[prefix]" if family == "prefix" else f"[[{family}]]"


def toml_value(value: Any) -> str:
    """A TOML literal for an option value (JSON's syntax coincides for these)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def _placeholder(opt: dict[str, Any], schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"][0]
    t = schema.get("type")
    lo = opt.get("min")
    if t == "integer":
        return max(8, int(lo)) if lo is not None else 8
    if t == "number":
        return float(lo) if lo is not None else 1.0
    if t == "boolean":
        return False
    if t == "array":
        return []
    return "..."


def example_rule(method: Method) -> str:
    """A rule for ``method`` that the spec loader accepts: its own ``example`` if
    it has one, else required keys with placeholders and every other option at its
    default (options without a TOML default, ``None``, are left out)."""
    own = getattr(method, "example", None)
    if own:
        return own.strip() + "\n"
    lines = [section_header(method.family), f'method = "{method.name}"']
    for opt in describe_options(method):
        if opt["selector"]:
            if opt["required"]:
                lines.append(f"{opt['name']} = {toml_value(_EXAMPLE_SELECTORS[opt['selector']])}")
            continue
        value = _placeholder(opt, opt["schema"]) if opt["required"] else opt["default"]
        if value is None:
            continue
        lines.append(f"{opt['name']} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def describe_method(method: Method, dist: str) -> dict[str, Any]:
    """Everything ``peftspec plugins METHOD --json`` prints."""
    return {**method.describe(), "distribution": dist, "section": section_header(method.family),
            "options": describe_options(method),
            "rule_keys": RULE_KEYS_DOC, "example": example_rule(method)}
