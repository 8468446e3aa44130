"""Writing an imported adapter's spec as readable TOML.

``peftspec import`` writes a spec a person can read and edit: a header naming
the HF PEFT folder and ``peft_type``, then each :class:`ImportedRule` as a
TOML table with its comment, long lists one item a line, regular expressions
as literal strings. The TOML is written by hand (:func:`toml_value`) because
the standard library only reads TOML.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from peftspec.formats.hf_peft.folder import refuse
from peftspec.formats.hf_peft.import_context import ImportedRule


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            refuse(f"cannot write {value} in a spec")
        return repr(value)
    if isinstance(value, str):
        if "\\" in value and "'" not in value and "\n" not in value:
            return f"'{value}'"  # a literal string: regular expressions stay readable
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} in a spec")


def spec_text(src: Path, config: dict, rules: list[ImportedRule]) -> str:
    version = f", written by peft {config['peft_version']}" if config.get("peft_version") else ""
    lines = [f"# Imported by `peftspec import` from the HF PEFT adapter {src.name}/",
             f"# (peft_type {config['peft_type']}{version}).", "",
             "[spec]", f"name = {toml_value(src.name)}",
             f"description = {toml_value('imported from HF PEFT (' + config['peft_type'] + ')')}",
             ""]
    for rule in rules:
        if rule.comment:
            lines += [f"# {c}" for c in rule.comment.splitlines()]
        lines.append("[prefix]" if rule.family == "prefix" else f"[[{rule.family}]]")
        for k, v in rule.table.items():
            line = f"{k} = {toml_value(v)}"
            if len(line) > 99 and isinstance(v, (list, tuple)):
                line = f"{k} = [\n" + "".join(f"    {toml_value(x)},\n" for x in v) + "]"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)
