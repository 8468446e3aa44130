"""Exceptions, and the one shape every reported problem takes.

Every error a user can cause is a :class:`PeftspecError` whose ``exit_code``
the CLI returns: 2 for bad input (a spec, a model source, an adapter file, a
plugin refusing the options), 3 for a plugin that failed (:class:`PluginError`:
an exception from its code, a broken promise), 1 for anything else. A :class:`SpecError` carries *all* problems found in one
pass, each located by file, line and key path, so a user fixes a spec in one
round trip instead of one error at a time.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, located as precisely as we can.

    Attributes:
        message: what is wrong, in words a user acts on.
        file: the file it is in (``None`` for in-memory text).
        line: 1-based line number, when known.
        key: dotted key path inside the spec, e.g. ``reparameterize[0].r``.
        hint: what to do about it, e.g. ``did you mean 'alpha'?``.
    """

    message: str
    file: str | None = None
    line: int | None = None
    key: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        loc = self.file or "<spec>"
        if self.line is not None:
            loc += f":{self.line}"
        text = f"{loc}: "
        if self.key:
            text += f"{self.key}: "
        text += self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class PeftspecError(Exception):
    """Base of every error peftspec raises on purpose."""

    exit_code = 1


class SpecError(PeftspecError, ValueError):
    """A spec (or its resolution against a model) is invalid.

    ``problems`` lists every problem found, not just the first.
    """

    exit_code = 2

    def __init__(self, problems: Sequence[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        n = len(self.problems)
        head = "1 problem" if n == 1 else f"{n} problems"
        super().__init__(f"{head}:\n" + "\n".join(f"  {p}" for p in self.problems))


class ModelSourceError(PeftspecError):
    """A ``--model`` source string could not be resolved to a model."""

    exit_code = 2


class AdapterFileError(PeftspecError):
    """An adapter file is unreadable, malformed, or does not fit the model."""

    exit_code = 2


class ConversionError(PeftspecError):
    """An adapter cannot be converted to or from another library's format
    (``peftspec export`` / ``peftspec import``): a method or option the other
    format cannot express, or a foreign adapter that is malformed."""

    exit_code = 2


class PluginError(PeftspecError):
    """A plugin is broken: an exception from its code that is not a refusal of
    the input (a ``KeyError`` from ``apply``), a broken frozen-base promise, a bad
    registration. The message names the distribution, method, rule and spec line."""

    exit_code = 3


class PluginInputError(PeftspecError, ValueError):
    """A plugin refused the input: a ``ValueError`` from one of its hooks (the
    documented way to say the options, model or data cannot serve), reported
    with the distribution, method, rule and spec line."""

    exit_code = 2


class OptionError(ValueError):
    """Raised by a plugin (``check``, ``resolve_options``, an options class's
    ``__post_init__``) to reject the value of one option: the error then points
    at that key's own line of the spec. ``OptionError("n", "must be at most 4096")``."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


class NotMergeableError(PeftspecError):
    """Merge was asked of a method that cannot fold into base weights."""


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """Return a ``did you mean 'x'?`` hint for the closest choice, if any."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
