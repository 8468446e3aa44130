"""Line numbers for TOML key paths.

``tomllib`` parses TOML but forgets where things were. Error messages must
name the line, so this module re-scans the text and records, for every key it
sees, the line it was written on. It understands what a spec uses: tables,
arrays of tables, dotted keys, inline tables and multi-line arrays and strings.
Paths are tuples such as ``("reparameterize", 0, "r")``.
"""

from __future__ import annotations

import re

_KEY = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED})\s*\]\]?")
_ASSIGN = re.compile(rf"^\s*({_DOTTED})\s*=")
_INLINE_KEY = re.compile(rf"[{{,]\s*({_DOTTED})\s*=")


def _split_dotted(text: str) -> list[str]:
    parts = re.findall(_KEY, text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _strip_strings_and_comment(line: str) -> str:
    """Blank out string contents and drop a trailing comment."""
    out, quote, i = [], None, 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = None
                out.append(c)
            i += 1
            continue
        if c == "#":
            break
        if c in "\"'":
            quote = c
        out.append(c)
        i += 1
    return "".join(out)


class LineMap:
    """Maps key paths of a TOML document to the 1-based line that defines them."""

    def __init__(self, text: str):
        self.lines: dict[tuple, int] = {}
        self.text_lines = text.splitlines()
        counters: dict[tuple, int] = {}
        table: tuple = ()
        depth = 0  # open brackets/braces of a value spanning lines
        in_multiline: str | None = None
        for lineno, raw in enumerate(self.text_lines, start=1):
            if in_multiline:
                if in_multiline in raw:
                    in_multiline = None
                continue
            for q in ('"""', "'''"):
                if raw.count(q) % 2 == 1:
                    in_multiline = q
            if depth == 0:
                m = _HEADER.match(raw)
                if m:
                    names = tuple(_split_dotted(m.group(2)))
                    if m.group(1) == "[[":
                        idx = counters.get(names, 0)
                        counters[names] = idx + 1
                        table = names + (idx,)
                    else:
                        table = names
                    self.lines.setdefault(table, lineno)
                    continue
                m = _ASSIGN.match(raw)
                if m:
                    path = table + tuple(_split_dotted(m.group(1)))
                    self.lines.setdefault(path, lineno)
                    rest = raw[m.end():]
                    for im in _INLINE_KEY.finditer(_strip_strings_and_comment("{" + rest)):
                        self.lines.setdefault(path + tuple(_split_dotted(im.group(1))), lineno)
            code = _strip_strings_and_comment(raw)
            depth += code.count("[") + code.count("{") - code.count("]") - code.count("}")
            if depth < 0 or _HEADER.match(raw):
                depth = 0

    def line_of(self, path: tuple) -> int | None:
        """Line of ``path``, or of its nearest enclosing key that we saw."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def line_of_item(self, path: tuple, value: str) -> int | None:
        """Line where the string ``value`` of the array at ``path`` is written."""
        start = self.line_of(path)
        if start is None:
            return None
        needle = [f'"{value}"', f"'{value}'"]
        for lineno in range(start, min(start + 200, len(self.text_lines)) + 1):
            text = self.text_lines[lineno - 1]
            if any(n in text for n in needle):
                return lineno
        return start


def format_path(path: tuple) -> str:
    """``("reparameterize", 0, "r")`` -> ``reparameterize[0].r``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out
