"""TOML syntax errors placed where the mistake is, not where the parser gave up.

``tomllib`` reports the position at which it could not go on. For an unclosed
construct that is often lines later: ``r = [8`` on line 4 is "Unclosed array
(at line 5, column 1)", because the parser only knows the array is unclosed
when it meets line 5. :func:`syntax_problem` re-scans the text up to that
position, tracking what is open (strings, arrays, inline tables, table
headers) with the line and column where each began, and names the innermost
construct still open there, adding where the parser stopped when that is
elsewhere. The scan is linear in the text and needs no parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peftspec.core.errors import Problem

_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_AT_END = "(at end of document)"
KINDS = {"[": "array", "{": "inline table", "header": "table header",
         "header2": "array-of-tables header",
         '"': "string", "'": "literal string", '"""': "multi-line string",
         "'''": "multi-line literal string"}
CLOSERS = {"[": "]", "{": "}", "header": "]", "header2": "]]", '"': '"', "'": "'", '"""': '"""',
           "'''": "'''"}


@dataclass(frozen=True)
class Opened:
    """A construct still open at some offset: its kind and where it began (1-based)."""

    kind: str
    line: int
    column: int

    @property
    def name(self) -> str:
        return KINDS[self.kind]


def _offset(text: str, line: int, column: int) -> int:
    """Offset of 1-based (line, column) in ``text`` (lines split on \\n, as tomllib)."""
    pos = 0
    for _ in range(line - 1):
        nl = text.find("\n", pos)
        if nl < 0:
            return len(text)
        pos = nl + 1
    return min(pos + column - 1, len(text))


def scan(text: str) -> list[list]:
    """Every string, array, inline table and table header of ``text`` as
    ``[kind, start offset, end offset or None if never closed]``, in order."""
    found: list[list] = []
    stack: list[list] = []
    i, n = 0, len(text)
    line_start = True  # only blanks since the last newline (a header may start)
    while i < n:
        c = text[i]
        top = stack[-1][0] if stack else None
        if top in ('"', "'", '"""', "'''"):
            close = CLOSERS[top]
            if c == "\\" and top in ('"', '"""') and (top == '"""' or text[i + 1:i + 2] != "\n"):
                i += 2
                continue
            if text.startswith(close, i):
                run = len(close)
                if run == 3:  # """a""""": up to two more quotes belong to the string
                    while run < 5 and i + run < n and text[i + run] == close[0]:
                        run += 1
                i += run
                stack.pop()[2] = i
                continue
            if c == "\n" and top in ('"', "'"):  # never closed; go on after it
                stack.pop()
            i += 1
            continue
        if c == "#":
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
            continue
        if c in " \t\r\n":
            line_start = line_start or c == "\n"
            i += 1
            continue
        was_line_start, line_start = line_start, False
        kind = None
        if c in "\"'":
            kind = c * 3 if text.startswith(c * 3, i) else c
        elif c == "[" and not stack and was_line_start:
            kind = "header2" if text.startswith("[[", i) else "header"
        elif c in "[{":
            kind = c
        if kind is not None:
            entry = [kind, i, None]
            found.append(entry)
            stack.append(entry)
            i += len(kind) if kind in ('"""', "'''") else (2 if kind == "header2" else 1)
            continue
        if stack and text.startswith(CLOSERS[stack[-1][0]], i):
            i += len(CLOSERS[stack[-1][0]])
            stack.pop()[2] = i
            continue
        i += 1
    return found


def open_at(text: str, end: int) -> Opened | None:
    """The innermost construct of ``text`` open at offset ``end`` that is never
    closed (a construct closed later is not the mistake, whatever is inside)."""
    unclosed = [e for e in scan(text) if e[1] < end and e[2] is None]
    return _opened(text, unclosed[-1]) if unclosed else None


def _opened(text: str, entry: list) -> Opened:
    kind, start, _ = entry
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    return Opened(kind, line, column)


def syntax_problem(text: str, exc: Exception, file: str | None) -> Problem:
    """The :class:`Problem` for ``tomllib``'s error ``exc`` on ``text``."""
    # Python < 3.14 puts the position only in the message: "... (at line 4, column 5)"
    msg = str(exc)
    m = _POSITION.search(msg)
    if m:
        line, col = int(m.group(1)), int(m.group(2))
        msg = msg[:m.start()]
        end = _offset(text, line, col)
        stopped = f"line {line}, column {col}"
    elif msg.endswith(_AT_END):
        msg = msg[: -len(_AT_END)].rstrip()
        line = max(1, len(text.splitlines()))
        col, end, stopped = None, len(text), "the end of the file"
    else:  # pragma: no cover - a tomllib message of another shape
        return Problem(f"TOML syntax error: {msg}", file=file)
    opened = open_at(text, end)
    if opened is not None and (opened.line, opened.column) != (line, col):
        where = stopped if opened.line != line or col is None else f"column {col}"
        closer = CLOSERS[opened.kind]
        return Problem(f"TOML syntax error at column {opened.column}: unclosed "
                       f"{opened.name} (no matching {closer!r}); the parser stopped at "
                       f"{where}: {msg}", file=file, line=opened.line)
    if m:
        return Problem(f"TOML syntax error at column {col}: {msg}", file=file, line=line)
    return Problem(f"TOML syntax error: {msg} at the end of the file", file=file, line=line)


_LONG_NUMBER = re.compile(r"[0-9_]{1000,}")


def unreadable_problem(text: str, exc: Exception, file: str | None) -> Problem:
    """The :class:`Problem` for TOML that is well-formed but cannot be read: nesting
    past the recursion limit (placed at the deepest construct) or a number too long."""
    line = None
    m = _LONG_NUMBER.search(text)
    if m and "digits" in str(exc):
        line = text.count("\n", 0, m.start()) + 1
    else:
        ends: list[int] = []
        deepest = (0, None)
        for kind, start, stop in scan(text):
            while ends and ends[-1] is not None and ends[-1] <= start:
                ends.pop()
            ends.append(stop if stop is not None else len(text) + 1)
            if len(ends) > deepest[0]:
                deepest = (len(ends), start)
        if deepest[1] is not None:
            line = text.count("\n", 0, deepest[1]) + 1
    return Problem(f"TOML cannot be read: {exc}", file=file, line=line,
                   hint="a spec needs neither; nest less, or write a shorter number")
