"""How many CPU threads torch's kernels use: the cores this process may run on.

torch sizes its intra-op thread pool from the machine's cores, not from the
ones the process is allowed (``taskset``, a container's CPU set or quota), so
a process limited to 2 of 16 cores runs 16 threads against each other. And
with as many threads as cores, one other busy process is enough for one
thread to be preempted while the rest spin at the next barrier waiting for it:
on this project's 2-core machine a 60-step quick start beside one busy
process took more than 7x its quiet time.

:func:`cores` counts the CPUs this process may use (``os.sched_getaffinity``,
and a cgroup v2 ``cpu.max`` quota where one is set); :func:`use` sets torch's
threads to an explicit count, else ``PEFTSPEC_THREADS``, else (unless
``OMP_NUM_THREADS`` is set, which torch follows) :func:`cores` less those that
other processes keep busy at the start (:func:`free_cores`, 0.1 s of
``/proc/stat``): beside one busy process on 2 cores, one thread took 1.5x the
quiet time of the quick start's steps where two took 2.4x, and OpenMP's
passive waiting (``OMP_WAIT_POLICY=PASSIVE``) 1.8x but cost 20% when quiet.
``peftspec train --threads N`` and ``[train_config] threads`` choose it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

ENV = "PEFTSPEC_THREADS"


def _quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The cgroup v2 CPU quota in whole CPUs (rounded up), or None where unlimited."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def cores() -> int:
    """The CPUs this process may run on (its affinity, within any cgroup quota)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _quota()
    return max(1, min(n, quota) if quota else n)


def _cpu_times(path: Path = Path("/proc/stat")) -> dict[int, tuple[int, int]]:
    """Per CPU: (idle + iowait jiffies, total jiffies), from ``/proc/stat``."""
    out = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            v = [int(x) for x in values]
            out[int(name[3:])] = (v[3] + (v[4] if len(v) > 4 else 0), sum(v[:8]))
    return out


def free_cores(window: float = 0.1) -> float | None:
    """How many of this process's CPUs other processes leave idle, sampled over
    ``window`` seconds (this process is idle meanwhile); None where unknown."""
    try:
        mine = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    idle = total = 0
    for cpu in mine:
        if cpu in a and cpu in b:
            idle += b[cpu][0] - a[cpu][0]
            total += b[cpu][1] - a[cpu][1]
    if total <= 0:
        return None
    return len(mine) * idle / total


_SEEN: list[float] = []  # (time, free cores) of the last sample


def _recent_free(within: float = 10.0) -> float | None:
    """:func:`free_cores`, sampled at most once per ``within`` seconds."""
    now = time.monotonic()
    if not _SEEN or now - _SEEN[0] > within:
        _SEEN[:] = [now, free_cores()]
    return _SEEN[1]


def wanted(threads: int | None = None) -> int | None:
    """The thread count to use: ``threads`` when positive, else the environment's
    ``PEFTSPEC_THREADS``; None where ``OMP_NUM_THREADS`` is set (torch already
    follows it: torchrun sets 1 per process); else :func:`cores`."""
    if threads:
        return int(threads)
    env = os.environ.get(ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{ENV}={env!r}: expected a positive integer") from None
        if n < 1:
            raise ValueError(f"{ENV}={env!r}: expected a positive integer")
        return n
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    n = cores()
    free = _recent_free() if n > 1 else None
    if free is not None:  # cores other processes keep busy would make threads wait
        n = max(1, min(n, round(free + 0.25)))
    return n


def use(threads: int | None = None) -> int:
    """Set torch's intra-op threads (see :func:`wanted`); returns the count."""
    import torch

    n = wanted(threads)
    if n is None:
        return torch.get_num_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
