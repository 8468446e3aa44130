"""Selectors: how a spec names modules and parameters of a model.

Three forms:

* glob on dotted names: ``*`` matches inside one name (``layers.*.q_proj``),
  ``**`` matches across names (``**.bias``, ``encoder.**``), ``?`` one
  character;
* ``re:<pattern>``: a regular expression that must match the *whole* name,
  in RE2's syntax (Python's, less backreferences and lookaround: see
  :mod:`peftspec.core.saferegex`, which compiles every pattern here so that
  matching takes linear time whatever a spec from a stranger says);
* ``type:<ClassName>``: modules whose class (or a base class) has that name;
  as a parameter selector, the parameters owned directly by such modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from peftspec.core.saferegex import Pattern, UnsafePattern, compile_pattern, escape


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
            out.append(escape(pattern[i]))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Selector:
    """One compiled selector string."""

    text: str
    kind: str  # "glob", "re" or "type"
    regex: Pattern | None
    type_name: str | None
    # globs without wildcards but a leading '**.' or a trailing '.**' (nearly
    # all): string tests, several times cheaper than any regex engine
    literal: tuple[str, str] | None = None

    def matches(self, name: str, type_names: frozenset[str] | tuple[str, ...] = ()) -> bool:
        """Does the selector pick ``name`` (whose module's class names are ``type_names``)?"""
        if self.kind == "type":
            return self.type_name in type_names
        if self.literal is not None:
            how, text = self.literal
            if how == "suffix":
                return name == text or name.endswith("." + text)
            if how == "prefix":
                return name == text or name.startswith(text + ".")
            return name == text
        return self.regex.fullmatch(name)


@lru_cache(maxsize=4096)
def parse_selector(text: str) -> Selector:
    """Compile ``text``; raises ``ValueError`` with a readable reason if malformed."""
    if text.startswith("re:"):
        try:
            return Selector(text, "re", compile_pattern(text[3:]), None)
        except UnsafePattern as exc:
            raise ValueError(f"selector {text!r}: {exc}") from None
    if text.startswith("type:"):
        name = text[5:].strip()
        if not name.isidentifier():
            raise ValueError(f"selector {text!r} must name a class, as in 'type:Linear'")
        return Selector(text, "type", None, name)
    if not text or text.strip() != text:
        raise ValueError(f"selector {text!r} is empty or has surrounding spaces")
    return Selector(text, "glob", _compile_glob(text), None, _literal(text))


def _literal(glob: str) -> tuple[str, str] | None:
    for how, core in (("suffix", glob[3:] if glob.startswith("**.") else None),
                      ("prefix", glob[:-3] if glob.endswith(".**") else None),
                      ("exact", glob)):
        if core and not any(c in core for c in "*?"):
            return how, core
    return None


def _compile_glob(glob: str) -> Pattern:
    try:
        return compile_pattern(_glob_to_regex(glob))
    except UnsafePattern as exc:  # only by length: a glob's regex is always RE2 syntax
        raise ValueError(f"selector {glob!r}: {exc}") from None


def class_names(obj: object) -> frozenset[str]:
    """Names of ``obj``'s class and its bases, for ``type:`` selectors."""
    return _mro_names(type(obj))


@lru_cache(maxsize=1024)
def _mro_names(cls: type) -> frozenset[str]:
    return frozenset(c.__name__ for c in cls.__mro__)
