"""The metrics log: one JSON object a line, per optimizer step and per evaluation.

Records::

    {"type": "train", "step": 3, "epoch": 0.25, "loss": 2.71, "lr": 0.001,
     "grad_norm": 0.93, "tokens": 3072, "tokens_per_s": 5120.4, "step_tokens": 1024,
     "scored_tokens": 388, "positions": 1100, "seconds": 0.2, "time": 0.61}
    {"type": "eval", "step": 3, "loss": 2.65, "tokens": 812}
    {"type": "eval", "step": 3, "loss": 0.41, "accuracy": 0.875, "examples": 48}

(the last for a classifier: mean cross-entropy and accuracy over examples).
In a step's record ``tokens`` counts every non-padding token trained on so
far and ``step_tokens`` this step's; ``positions`` are the batch's rows x
length, padding included; ``seconds`` is this step's time, and ``time`` the
seconds since the first step began (cumulative: one epoch's time is its last
step's ``time``).

``step`` counts optimizer steps done. A resumed run first drops the records
written after its checkpoint's step (a killed run may have logged past it), so
the log reads as one uninterrupted run.

A path that cannot be written (a folder, a read-only place) is refused
before the model loads (:func:`check_path`); a write that fails mid-run (a
full disk) stops the run with a one-line error naming the log, like every
other bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftspec.core.errors import PeftspecError
from peftspec.core.untrusted import BadText, json_loads


class MetricsLogError(PeftspecError):
    """The metrics log (``--log``) cannot be written."""

    exit_code = 2


def _refuse(path: Path, exc: OSError, doing: str) -> MetricsLogError:
    why = exc.strerror or str(exc)
    return MetricsLogError(f"--log {path}: cannot {doing} the metrics log ({why}); give a "
                           "file path in a writable folder, or leave --log out")


def check_path(path: str | Path | None) -> None:
    """Refuse a ``--log`` path that cannot be written, before anything is loaded
    (an existing log is left as it is; a file this creates is removed again)."""
    if not path:
        return
    path = Path(path)
    if path.is_dir():
        raise MetricsLogError(f"--log {path}: is a folder; give a file path, e.g. "
                              f"{path / 'metrics.jsonl'}")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise _refuse(path, exc, "create") from None
    if not existed:
        path.unlink(missing_ok=True)


class MetricsLog:
    """Appends records to ``path`` (``None``: discards them)."""

    def __init__(self, path: str | Path | None, resume_step: int | None = None):
        self.path = Path(path) if path else None
        self._f = None
        if self.path is None:
            return
        check_path(self.path)
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read(self.path) if r.get("step", 0) <= resume_step]
        try:
            with self.path.open("w", encoding="utf-8") as f:
                for rec in kept:
                    f.write(json.dumps(rec) + "\n")
            self._f = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise _refuse(self.path, exc, "write") from None

    def write(self, record: dict) -> None:
        if self._f is not None:
            try:
                self._f.write(json.dumps(record) + "\n")
                self._f.flush()
            except OSError as exc:
                raise _refuse(self.path, exc, f"write step {record.get('step')} to") \
                    from None

    def close(self) -> None:
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:  # the failed write already said why
                pass


def read(path: str | Path) -> list[dict]:
    """Every record of a metrics log; a torn last line (a killed run) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json_loads(line)
        except BadText:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records
