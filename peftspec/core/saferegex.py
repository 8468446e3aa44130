"""Regular expressions from outside, matched in linear time (RE2).

Specs and HF PEFT configs come from strangers, and Python's ``re`` backtracks:
``re:([\\w.]+)+[!?]`` against a 35-character module name takes minutes, twice
as long for every character more. Every pattern a user or a file supplies (a
spec's ``re:`` selectors and globs, HF PEFT's ``target_modules`` /
``exclude_modules`` strings, ``layers_pattern``, ``modules_to_save``, the keys
of ``rank_pattern`` / ``alpha_pattern``) is compiled here with RE2 (the
``google-re2`` package), whose matching time is linear in the name's length
whatever the pattern.

RE2's syntax is Python's for everything a module name needs (classes,
alternation, groups, ``(?P<name>...)``, counted repetition up to 1000, ``(?i)``)
and refuses what cannot run in linear time: backreferences (``\\1``),
lookahead and lookbehind (``(?=``, ``(?!``, ``(?<=``, ``(?<!``), atomic groups
and possessive quantifiers, and conditionals. ``\\Z`` is spelled ``\\z``. A
refused pattern raises :class:`UnsafePattern` (a ``ValueError``) whose message
says which construct and what to write instead; callers add the file, line
and key.
"""

from __future__ import annotations

import string
from functools import lru_cache

import re2

# RE2 gives each compiled program a memory budget; past it compilation fails
# (instead of a pattern like (a{1000}){1000} taking gigabytes).
MAX_MEM = 8 << 20
MAX_PATTERN_CHARS = 4096

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print every refusal to stderr
_OPTIONS.max_mem = MAX_MEM

# RE2's error text -> what the user should know about it
_EXPLAIN = (
    ("invalid perl operator: (?=", "lookahead (?=...) is not supported"),
    ("invalid perl operator: (?!", "negative lookahead (?!...) is not supported; "
                                   "list what to leave out under 'exclude' instead"),
    ("invalid perl operator: (?<=", "lookbehind (?<=...) is not supported"),
    ("invalid perl operator: (?<!", "negative lookbehind (?<!...) is not supported; "
                                    "list what to leave out under 'exclude' instead"),
    ("invalid perl operator: (?>", "atomic groups (?>...) are not supported"),
    ("invalid perl operator: (?(", "conditionals (?(...)...) are not supported"),
    ("invalid escape sequence: \\Z", "\\Z is written \\z here"),
    ("bad repetition operator: ++", "possessive quantifiers (++) are not supported"),
    ("bad repetition operator: *+", "possessive quantifiers (*+) are not supported"),
    ("bad repetition operator: ?+", "possessive quantifiers (?+) are not supported"),
    ("invalid repetition size", "a counted repetition is at most {1000}"),
    ("pattern too large", "the pattern compiles to more than 8 MiB; simplify it"),
)


class UnsafePattern(ValueError):
    """A pattern RE2 refuses: unsupported syntax, or too large."""


def _explain(pattern: str, detail: str) -> str:
    if detail.startswith("invalid escape sequence: \\") and detail[-1:].isdigit():
        why = "backreferences (\\1, \\2, ...) are not supported"
    else:
        why = next((text for key, text in _EXPLAIN if detail.startswith(key)), None)
    msg = f"invalid regular expression {pattern!r}: {detail}"
    if why:
        msg += f" ({why}: peftspec matches with RE2, in linear time; see the README's " \
               "'Selectors')"
    return msg


class Pattern:
    """A compiled pattern; the three anchored questions peftspec asks of names."""

    __slots__ = ("pattern", "_rx", "_match")

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise UnsafePattern(f"expected a pattern string, got {pattern!r:.60}")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise UnsafePattern(f"regular expression of {len(pattern)} characters is longer "
                                f"than {MAX_PATTERN_CHARS}")
        if "\x00" in pattern:
            raise UnsafePattern(f"regular expression {pattern!r:.60} holds a NUL character")
        try:
            rx = re2.compile(pattern, _OPTIONS)
        except re2.error as exc:
            detail = exc.args[0] if exc.args else str(exc)
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            raise UnsafePattern(_explain(pattern, str(detail))) from None
        self.pattern = pattern
        self._rx = rx
        # The wrapper's match objects cost ~14 us a call; a yes/no through the
        # compiled program itself costs ~2 (a plan matches every module name).
        self._match = getattr(getattr(rx, "_regexp", None), "Match", None)

    def _test(self, anchor, text: str) -> bool:
        if self._match is not None:
            data = text.encode("utf-8", "surrogatepass")
            return self._match(anchor, data, 0, len(data))[0][0] != -1
        fn = self._rx.fullmatch if anchor is _BOTH else self._rx.match
        return fn(text) is not None  # pragma: no cover - another google-re2 layout

    def fullmatch(self, text: str) -> bool:
        """Does the pattern match all of ``text``?"""
        return self._test(_BOTH, text)

    def match(self, text: str) -> bool:
        """Does the pattern match a prefix of ``text`` (``re.match``)?"""
        return self._test(_START, text)

    def group(self, text: str, name: str) -> str | None:
        """Group ``name`` of a match at the start of ``text``, or ``None``."""
        m = self._rx.match(text)
        return None if m is None else m.group(name)


_BOTH = re2._Anchor.ANCHOR_BOTH
_START = re2._Anchor.ANCHOR_START


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Pattern:
    """:class:`Pattern` for ``pattern`` (cached); raises :class:`UnsafePattern`."""
    return Pattern(pattern)


def escape(text: str) -> str:
    """``text`` as a pattern matching exactly itself, in syntax RE2 accepts
    (ASCII punctuation backslashed, anything else outside ``\\w`` as ``\\x{...}``)."""
    out = []
    for c in text:
        if c.isascii() and (c.isalnum() or c == "_"):
            out.append(c)
        elif c.isascii() and c in _PUNCTUATION:
            out.append("\\" + c)
        else:
            out.append(f"\\x{{{ord(c):x}}}")
    return "".join(out)


_PUNCTUATION = frozenset(string.punctuation)


__all__ = ["Pattern", "UnsafePattern", "compile_pattern", "escape", "MAX_PATTERN_CHARS"]
