"""What the bench scripts report about the machine they ran on: no torch imported
(bench_train.py's parent process must stay lean), nothing timed here."""

from __future__ import annotations

import os
import platform


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
