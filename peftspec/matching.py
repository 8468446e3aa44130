"""Selectors: how a spec names modules and parameters of a model.

Three forms:

* glob on dotted names: ``*`` matches inside one name (``layers.*.q_proj``),
  ``**`` matches across names (``**.bias``, ``encoder.**``), ``?`` one
  character;
* ``re:<pattern>``: a Python regular expression that must match the *whole*
  name;
* ``type:<ClassName>``: modules whose class (or a base class) has that name;
  as a parameter selector, the parameters owned directly by such modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


def _glob_to_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**.", i):
            out.append(r"(?:.*\.)?")
            i += 3
        elif pattern.startswith(".**", i) and i + 3 == len(pattern):
            out.append(r"(?:\..*)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Selector:
    """One compiled selector string."""

    text: str
    kind: str  # "glob", "re" or "type"
    regex: re.Pattern | None
    type_name: str | None

    def matches(self, name: str, type_names: frozenset[str] | tuple[str, ...] = ()) -> bool:
        """Does the selector pick ``name`` (whose module's class names are ``type_names``)?"""
        if self.kind == "type":
            return self.type_name in type_names
        return self.regex.fullmatch(name) is not None


@lru_cache(maxsize=4096)
def parse_selector(text: str) -> Selector:
    """Compile ``text``; raises ``ValueError`` with a readable reason if malformed."""
    if text.startswith("re:"):
        try:
            return Selector(text, "re", re.compile(text[3:]), None)
        except re.error as exc:
            raise ValueError(f"invalid regular expression in selector {text!r}: {exc}") from None
    if text.startswith("type:"):
        name = text[5:].strip()
        if not name.isidentifier():
            raise ValueError(f"selector {text!r} must name a class, as in 'type:Linear'")
        return Selector(text, "type", None, name)
    if not text or text.strip() != text:
        raise ValueError(f"selector {text!r} is empty or has surrounding spaces")
    return Selector(text, "glob", re.compile(_glob_to_regex(text)), None)


def class_names(obj: object) -> frozenset[str]:
    """Names of ``obj``'s class and its bases, for ``type:`` selectors."""
    return _mro_names(type(obj))


@lru_cache(maxsize=1024)
def _mro_names(cls: type) -> frozenset[str]:
    return frozenset(c.__name__ for c in cls.__mro__)
