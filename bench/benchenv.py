"""What the bench scripts report about the machine they ran on: no torch imported
(bench_train.py's parent process must stay lean), nothing timed here."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        cpu)
    except OSError:
        return cpu


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded; None where unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def status_mb(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (any kB line of ``/proc/self/status``) in MiB, else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def header(env: dict, quick: bool, seconds: float | None = None) -> str:
    """The line each bench prints above its tables: versions, machine, load average."""
    line = (f"peftspec {env['peftspec']} vs peft {env['peft']} | torch {env['torch']}, "
            f"transformers {env['transformers']}, Python {env['python']} | {env['cpu']}, "
            f"{env['threads']} threads of {env['cpus']} CPUs | load avg "
            f"{env['loadavg_start']} -> {env['loadavg_end']}")
    if seconds is not None:
        line += f" | {seconds:.0f} s"
    return line + (" | QUICK (smoke test, not the real sizes)" if quick else "")


def spawn(cmd: list, env: dict | None = None) -> float:
    """Run ``cmd`` in its own process, its output dropped; its peak RSS in MiB
    (``wait4``: this child's own, not a parent's). Stops the bench, with the
    child's last stderr, if it fails."""
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"{' '.join(map(str, cmd[:4]))} ... failed ({code}):\n{err.decode()[-3000:]}")
    return usage.ru_maxrss / 1024


def peftspec_train(args: list, log: Path, env: dict | None = None) -> tuple[list[dict], float]:
    """``peftspec train ARGS --log LOG`` (this interpreter's) in its own process:
    the log's records and the run's peak RSS in MiB."""
    log = Path(log)
    log.unlink(missing_ok=True)
    exe = Path(sys.executable).parent / "peftspec"
    rss = spawn([exe, "train", *args, "--log", log], env)
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()], rss
