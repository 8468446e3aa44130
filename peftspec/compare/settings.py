"""What one comparison holds fixed, and how a finished run is recognised.

A run's *key* is a SHA-256 over everything that decides its result: the
spec's text, the model source, the digests of the data, eval and reference
files, every setting, and the peftspec version. A record on disk whose key
matches is read back instead of training again; one whose key differs (the
spec or a setting changed) is stale and the run is redone.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from peftspec.core.errors import PeftspecError
from peftspec.core.spec import load_spec
from peftspec.data.examples import read_text
from peftspec.core.version import __version__
from peftspec.data.examples import read_examples
from peftspec.generate import read_prompts

FULL = "full fine-tuning"
# every original parameter trainable: what --full trains, through [[train]]
FULL_SPEC = f'[spec]\nname = "{FULL}"\n\n[[train]]\nparams = ["**"]\n'
DEFAULT_REFERENCE = Path(__file__).resolve().parent.parent.parent / "data" / "reference.txt"


class CompareError(PeftspecError):
    """Bad input to ``peftspec compare`` (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Settings:
    """Everything every run of one comparison shares."""

    model: str | None
    data: str
    eval: str | None = None
    eval_split: float = 0.0
    reference: str | None = None
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    full_lr: float | None = None  # full fine-tuning's peak lr (None: lr)
    warmup: int = 0
    max_length: int = 128
    seed: int = 0
    eval_every: int = 0  # 0: about ten points on the curve
    gen_tokens: int = 16  # new tokens per latency measurement
    precision: str = "fp32"
    probe: str | None = None  # prompts answered greedily by the base and each adapter
    probe_tokens: int = 32

    def __post_init__(self):
        if self.eval is None and not self.eval_split:
            raise CompareError("compare needs evaluation data: give --eval FILE or "
                               "--eval-split FRACTION")
        if self.eval is not None and self.eval_split:
            raise CompareError("give --eval or --eval-split, not both")
        if self.steps < 1:
            raise CompareError(f"--steps must be at least 1, got {self.steps}")
        if self.gen_tokens < 2:
            raise CompareError(f"--gen-tokens must be at least 2, got {self.gen_tokens}")

    @property
    def curve_every(self) -> int:
        return self.eval_every or max(1, self.steps // 10)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


@dataclass(frozen=True)
class Entry:
    """One row: a spec file, or full fine-tuning (``spec`` None)."""

    name: str
    spec: str | None
    text: str = field(repr=False, default="")

    @property
    def is_full(self) -> bool:
        return self.spec is None

    @property
    def slug(self) -> str:
        """The run's folder name: the row name, filesystem-safe."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-.") or "run"


def entries(specs: list[Path], full: bool) -> list[Entry]:
    """One entry per spec file (named after its ``[spec] name``, else its file
    stem, made unique), plus full fine-tuning with ``full``. Every spec is
    loaded first, so a bad one stops the comparison before anything trains."""

    if not specs and not full:
        raise CompareError("nothing to compare: give one or more SPEC files (and/or --full)")
    rows, seen = [], set()
    for path in specs:
        text = read_text(path, "spec file")
        s = load_spec(path)  # SpecError names the file, line and key
        base = s.name or path.stem
        name, n = base, 2
        while name in seen or name == FULL:
            name, n = f"{base}-{n}", n + 1
        seen.add(name)
        rows.append(Entry(name, str(path), text))
    if full:
        rows.append(Entry(FULL, None, FULL_SPEC))
    slugs = [e.slug for e in rows]
    for e in rows:
        if slugs.count(e.slug) > 1:
            raise CompareError(f"two rows would share the run folder {e.slug!r} "
                               f"({', '.join(r.name for r in rows if r.slug == e.slug)}); "
                               "give the specs distinct [spec] names")
    return rows


def _digest(path: str | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_key(entry: Entry, settings: Settings) -> str:
    """What decides this run's result, hashed (see the module docstring)."""

    parts = {"spec": entry.text, "full": entry.is_full, "settings": settings.to_dict(),
             "data": _digest(settings.data), "eval": _digest(settings.eval),
             "reference": _digest(settings.reference), "version": __version__}
    parts["probe"] = _digest(settings.probe)
    for key in ("data", "eval", "reference", "probe"):  # paths may move; contents decide
        parts["settings"][key] = None
    # full_lr only concerns the full fine-tuning row: a comparison with and one
    # without --full must share their other rows
    if entry.is_full:
        parts["settings"]["lr"] = settings.full_lr if settings.full_lr is not None \
            else settings.lr
    parts["settings"]["full_lr"] = None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def check_inputs(settings: Settings) -> None:
    """Every input file readable, before a run starts (each error names its file)."""

    read_examples(settings.data)
    if settings.eval:
        read_examples(settings.eval)
    if settings.probe:

        read_prompts(settings.probe)
    if settings.reference:
        examples = read_examples(settings.reference)
        if examples[0].label is not None:
            raise CompareError(f"{settings.reference}: the reference text must be text "
                               "(a .txt file, or {\"text\"} records), not classification "
                               "records")
