"""What the conformance kit reports: one :class:`Result` per check."""

from __future__ import annotations

from dataclasses import dataclass, field

CHECKS = ("count_params", "unchanged_at_apply", "frozen_base", "modules", "save_load",
          "buffers", "switching", "rows", "remove", "merge", "hf_peft")


class Failed(Exception):
    """A check found a fault; its message names it."""


class Skip(Exception):
    """A check does not apply; its message says why."""


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise Failed(message)


@dataclass(frozen=True)
class Result:
    check: str
    status: str  # "passed", "failed" or "skipped"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.check}: {self.status}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Report:
    """What :func:`check_method` found, one :class:`Result` per check."""

    results: list[Result] = field(default_factory=list)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status == "failed"]

    def status(self, check: str) -> str:
        return next(r.status for r in self.results if r.check == check)

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.results)


class ConformanceError(AssertionError):
    """One or more conformance checks failed; ``report`` has them all."""

    def __init__(self, report: Report):
        self.report = report
        super().__init__("conformance checks failed:\n" + "\n".join(
            f"  {r}" for r in report.failures) + "\nall checks:\n" + "\n".join(
            f"  {r}" for r in report.results))
