"""Parsing JSON and TOML from outside without surprises.

``json.loads`` and ``tomllib.loads`` raise more than their decode errors on
hostile input: ``[[[[...`` nested a few thousand deep raises
``RecursionError``, and an integer of 5,000 digits a plain ``ValueError``
(Python's limit on int conversion). Callers that promise "a clear error,
never another exception" (data files, adapter metadata, HF PEFT configs,
checkpoints, specs) parse through :func:`json_loads` / :func:`toml_loads`,
which raise only :class:`BadText` (a ``ValueError``) with a message a user can
act on; each caller wraps it in its own :class:`~peftspec.core.errors.PeftspecError`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class BadText(ValueError):
    """Text that does not parse; ``str()`` says why, ``lineno`` where if known."""

    def __init__(self, message: str, lineno: int | None = None, colno: int | None = None):
        super().__init__(message)
        self.lineno, self.colno = lineno, colno


def json_loads(text: str | bytes) -> Any:
    """``json.loads``, raising only :class:`BadText`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadText(f"{exc.msg} at line {exc.lineno}, column {exc.colno}", exc.lineno,
                      exc.colno) from None
    except RecursionError:
        raise BadText("nested too deeply (arrays or objects inside each other more than "
                      f"{sys.getrecursionlimit() // 2} levels or so)") from None
    except (ValueError, TypeError, UnicodeDecodeError) as exc:  # e.g. a 5,000-digit integer
        raise BadText(str(exc)) from None


def toml_loads(text: str) -> dict:
    """``tomllib.loads``; its decode errors pass through (the caller places them), the
    rest become :class:`BadText`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise
    except RecursionError:
        raise BadText("arrays or inline tables nested too deeply to read") from None
    except (ValueError, TypeError) as exc:  # e.g. a 5,000-digit integer
        raise BadText(str(exc)) from None


__all__ = ["BadText", "json_loads", "toml_loads"]
