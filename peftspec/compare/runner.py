"""The parent of a comparison: one worker process per run, finished runs read
back, ``results.json`` written at the end.

Layout of ``OUT``::

    OUT/results.json            every record, the command and the environment
    OUT/runs/NAME/job.json      what the worker was asked to do
    OUT/runs/NAME/result.json   the run's record, written last (atomically)
    OUT/runs/NAME/adapter.safetensors, metrics.jsonl, log.txt (the worker's stderr)
    OUT/*.png                   the figures (:mod:`peftspec.compare.figures`)

A run whose ``result.json`` holds the key of the present settings
(:func:`peftspec.compare.settings.run_key`) is not repeated; any other run
(never started, interrupted, failed, or made with other settings) is run
from the start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from peftspec.core.atomicio import atomic_write_bytes
from peftspec.compare.measure import environment
from peftspec.compare.settings import CompareError, Entry, Settings, check_inputs, run_key
from peftspec.compare.worker import PREFIX

RESULTS = "results.json"
LOCK = ".compare.lock"


@contextlib.contextmanager
def locked(out: Path):
    """Hold ``OUT/.compare.lock`` for the whole comparison.

    Two comparisons writing the same folder would each redo and overwrite the
    other's runs (a run's directory is emptied when it starts); the second
    one is refused instead, naming the process that holds the folder. The
    lock is an ``flock``: the kernel drops it when its process dies, so an
    interrupted comparison never leaves the folder locked."""
    path = Path(out) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise CompareError(f"{out}: another `peftspec compare` (pid {holder}) is writing "
                               "to this folder; wait for it to finish, or give another --out"
                               ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def cached_record(run_dir: Path, key: str) -> dict | None:
    """The finished record in ``run_dir`` if it was made with ``key``, else None."""
    path = run_dir / "result.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_one(entry: Entry, settings: Settings, run_dir: Path, key: str,
            on_event: Callable[[dict], None], python: str = sys.executable) -> dict:
    """Train and measure ``entry`` in a worker process; return its record.

    Raises CompareError (with the worker's message, or the tail of its log)
    when the run fails."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    job = {"entry": {"name": entry.name, "spec": entry.spec, "text": entry.text},
           "settings": settings.to_dict(), "dir": str(run_dir), "key": key}
    job_path = run_dir / "job.json"
    atomic_write_bytes(job_path, json.dumps(job, indent=1).encode())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    error = None
    with open(run_dir / "log.txt", "wb") as log:
        proc = subprocess.Popen([python, "-m", "peftspec.compare.worker", str(job_path)],
                                stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        try:
            for line in proc.stdout:
                if not line.startswith(PREFIX):
                    log.write(line.encode())
                    continue
                event = json.loads(line[len(PREFIX):])
                if event["type"] == "error":
                    error = event
                on_event(event)
            rc = proc.wait()
        except BaseException:  # Ctrl-C: stop the worker too; the run is redone next time
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if rc != 0 or error is not None:
        why = error["message"] if error else \
            f"the worker exited with status {rc}:\n{_tail(run_dir / 'log.txt')}"
        raise CompareError(f"{entry.name}: {why}")
    record = cached_record(run_dir, key)
    if record is None:
        raise CompareError(f"{entry.name}: the worker finished without writing "
                           f"{run_dir / 'result.json'}")
    return record


def compare(entries: list[Entry], settings: Settings, out: Path, *, command: list[str],
            on_event: Callable[[Entry, dict], None] = lambda entry, event: None) -> dict:
    """Run (or read back) every entry; write and return ``OUT/results.json``'s content.

    ``on_event(entry, event)`` sees the worker's events and, per run, one of
    ``{"type": "cached"}`` (read back), ``{"type": "finished", "record": ...}``
    or ``{"type": "failed", "message": ...}``. A failed run does not stop the
    others; the returned ``failed`` list names them."""
    check_inputs(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        return _compare(entries, settings, out, command, on_event)


def _compare(entries, settings, out: Path, command, on_event) -> dict:
    records, failed = [], []
    for entry in entries:
        run_dir = out / "runs" / entry.slug
        key = run_key(entry, settings)
        record = cached_record(run_dir, key)
        if record is not None:
            on_event(entry, {"type": "cached", "record": record})
        else:
            try:
                record = run_one(entry, settings, run_dir, key,
                                 lambda e, entry=entry: on_event(entry, e))
            except CompareError as exc:
                failed.append({"name": entry.name, "spec": entry.spec, "error": str(exc)})
                on_event(entry, {"type": "failed", "message": str(exc)})
                continue
            on_event(entry, {"type": "finished", "record": record})
        records.append(record)
    results = {"command": command, "environment": environment(),
               "settings": settings.to_dict(), "runs": records, "failed": failed}
    atomic_write_bytes(out / RESULTS, json.dumps(results, indent=1, default=str).encode())
    return results


def read_results(out: Path) -> dict:
    """``OUT/results.json``, checked enough to draw from."""
    path = Path(out) / RESULTS
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: no such file; run `peftspec compare SPEC... --out "
                           f"{out}` first") from None
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: not a readable results file ({exc})") from None
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise CompareError(f"{path}: not a peftspec compare results file (no 'runs' list)")
    return results
