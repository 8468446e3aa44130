"""A JSON Schema of the whole spec format, built from the registered methods.

TOML editors validate and complete with JSON Schema (Taplo, and through it VS
Code's Even Better TOML): ``peftspec schema --out peftspec.schema.json``, then
``#:schema ./peftspec.schema.json`` as a spec's first line, or an association
in the editor's settings (see ``docs/plugins.md``). The schema is generated,
never written by hand, so a third-party method installed here appears in it
with its own options, docs, defaults and bounds.

Each section's rules are selected by their ``method`` key: a ``oneOf`` with
one branch per method, each pinning ``method`` to its name and listing that
method's options with unknown keys forbidden, as the spec loader forbids them.
Draft 4 (no ``const``, no ``if``/``then``): the draft Taplo documents as fully
supported, so editors apply the per-method options instead of ignoring
keywords they do not know. What the loader checks across keys
(``__post_init__``) or against a model (selectors matching) is beyond a
schema; ``peftspec check`` / ``plan`` remain the authority.
"""

from __future__ import annotations

from typing import Any

from peftspec.core.version import __version__
from peftspec.core.explain import RULE_KEYS_DOC, option_schema
from peftspec.core.spec import DEFAULT_METHOD, SECTIONS, SPEC_KEYS
from peftspec.core.train_config import OPTIONS as TRAIN_OPTIONS
from peftspec.core.registry import registry_or_default
from peftspec.core.explain import is_required

DRAFT = "http://json-schema.org/draft-04/schema#"


def _method_schema(method) -> dict[str, Any]:
    import dataclasses
    import typing


    cls = method.Options
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {
        "method": {"enum": [method.name], "description": (method.summary or method.name)},
        "exclude": {"type": "array", "items": {"type": "string", "minLength": 1},
                    "description": RULE_KEYS_DOC["exclude"]},
        "optional": {"type": "boolean", "default": False,
                     "description": RULE_KEYS_DOC["optional"]},
    }
    required = []
    for f in dataclasses.fields(cls):
        props[f.name] = option_schema(f, hints[f.name])
        if is_required(f):
            required.append(f.name)
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "additionalProperties": False}
    if method.family not in DEFAULT_METHOD or DEFAULT_METHOD[method.family] != method.name:
        required.insert(0, "method")  # [[train]] without a method is a select rule
    out["required"] = required
    return out


def _rule_schema(family: str, methods: dict) -> dict[str, Any]:
    """One ``oneOf`` branch per method of ``family``, told apart by ``method``
    (an ``enum`` of one name: draft 4 has no ``const``); every branch forbids
    unknown keys, so exactly one matches a valid rule."""
    names = sorted(n for n, m in methods.items() if m.family == family)
    if not names:
        return {"not": {}, "description": f"no method for [{family}] is installed"}
    return {"oneOf": [{"$ref": f"#/definitions/method:{n}"} for n in names],
            "description": f"a rule; methods: {', '.join(names)}"}


def _train_config_schema() -> dict[str, Any]:
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    props = {}
    for key, opt in TRAIN_OPTIONS.items():
        s: dict[str, Any] = {"type": simple[opt.type], "description": opt.help}
        if opt.type is float:
            s["type"] = "number"
        if opt.min is not None:
            s["minimum"] = opt.min
        if opt.max is not None:
            s["maximum"] = opt.max
        if opt.choices:
            s["enum"] = list(opt.choices)
        if opt.default is not None:
            s["default"] = opt.default
        if opt.several:  # one value, or a list of them
            one = {k: v for k, v in s.items() if k != "description"}
            s = {"description": opt.help,
                 "anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}
        props[key] = s
    return {"type": "object", "properties": props, "additionalProperties": False,
            "description": "defaults for `peftspec train` (the command line wins)"}


def spec_schema(registry=None) -> dict[str, Any]:
    """The JSON Schema (draft 4) of a spec, for the methods ``registry`` holds."""
    registry = registry_or_default(registry)
    methods = {n: info.method for n, info in registry.methods.items()}
    defs: dict[str, Any] = {f"method:{n}": _method_schema(m) for n, m in sorted(methods.items())}
    props: dict[str, Any] = {
        "spec": {"type": "object", "additionalProperties": False,
                 "properties": {k: {"type": "string"} for k in SPEC_KEYS},
                 "description": "the spec's name and description"},
        "train_config": _train_config_schema(),
    }
    for family in SECTIONS:
        defs[f"rule:{family}"] = _rule_schema(family, methods)
        ref = {"$ref": f"#/definitions/rule:{family}"}
        props[family] = ref if family == "prefix" else {"type": "array", "items": ref}
    return {
        "$schema": DRAFT,
        "title": "peftspec spec",
        "description": f"A peftspec TOML spec (peftspec {__version__}; methods: "
                       + ", ".join(sorted(methods)) + ")",
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "definitions": defs,
    }
