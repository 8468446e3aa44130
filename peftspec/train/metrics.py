"""The metrics log: one JSON object a line, per optimizer step and per evaluation.

Records::

    {"type": "train", "step": 3, "epoch": 0.25, "loss": 2.71, "lr": 0.001,
     "grad_norm": 0.93, "tokens": 3072, "tokens_per_s": 5120.4, "time": 0.61}
    {"type": "eval", "step": 3, "loss": 2.65, "tokens": 812}
    {"type": "eval", "step": 3, "loss": 0.41, "accuracy": 0.875, "examples": 48}

(the last for a classifier: mean cross-entropy and accuracy over examples).

``step`` counts optimizer steps done. A resumed run first drops the records
written after its checkpoint's step (a killed run may have logged past it), so
the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..untrusted import BadText, json_loads


class MetricsLog:
    """Appends records to ``path`` (``None``: discards them)."""

    def __init__(self, path: str | Path | None, resume_step: int | None = None):
        self.path = Path(path) if path else None
        self._f = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read(self.path) if r.get("step", 0) <= resume_step]
        with self.path.open("w", encoding="utf-8") as f:
            for rec in kept:
                f.write(json.dumps(rec) + "\n")
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


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
