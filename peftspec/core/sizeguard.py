"""Refusing an adapter too large to allocate, before allocating it.

A spec from a stranger can say ``tokens = 100000000000`` or a size that the
compiler's per-method checks do not bound. torch would then ask the allocator
for terabytes: an error at best, and, where the kernel overcommits, a machine
that swaps to a halt. :func:`check_fits` compares what a plan would allocate
(:attr:`Plan.adapter_bytes`, known exactly at compile time, times what training
adds) with the base model and with the memory available, and raises
:class:`AdapterTooLarge` with the figures unless the caller says ``force``
(``--force`` on the command line). Only the caller's flag lifts it: no spec or
adapter file can, so a file cannot talk its way past the check.
"""

from __future__ import annotations

import os

from peftspec.core.errors import PeftspecError

# weights + gradients + AdamW's two states (float32 step counters are negligible)
TRAINING_FACTOR = 4
# An adapter larger than its base is refused only past this size: below it,
# nothing can hurt (test models of a few hundred parameters take adapters
# larger than themselves, on purpose).
MIN_REFUSED_BYTES = 64 << 20


class AdapterTooLarge(PeftspecError):
    """A plan would allocate more than the base model, or than the memory available."""

    exit_code = 2


def available_memory() -> int | None:
    """Bytes of memory available for new allocations (Linux ``MemAvailable``), or
    ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def check_fits(plan, *, force: bool = False, training: bool = False,
               available: int | None = None) -> None:
    """Raise :class:`AdapterTooLarge` if ``plan`` adds more parameters than its base
    has (and more than :data:`MIN_REFUSED_BYTES`), or needs more bytes than are
    available (``available``: default, this machine's); ``training`` counts
    gradients and optimizer states too."""
    if force:
        return
    added, base = plan.params_added, plan.base_params
    new_bytes = plan.bytes_added
    need = new_bytes + (plan.adapter_bytes * (TRAINING_FACTOR - 1) if training else 0)
    what = "training it needs" if training else "it allocates"
    where = f" (spec {plan.spec.file})" if plan.spec.file else ""
    if base and added > base and new_bytes > MIN_REFUSED_BYTES:
        raise AdapterTooLarge(
            f"the adapter would add {added:,} parameters ({_gib(new_bytes)}), more than the "
            f"base model's {base:,}{where}: check r, tokens and size in the spec, or pass "
            "--force (force=True) if you mean it")
    free = available_memory() if available is None else available
    if free is not None and need > free:
        raise AdapterTooLarge(
            f"the adapter would not fit in memory: {what} {_gib(need)} ({need:,} bytes), "
            f"{_gib(free)} is available{where}; shrink the spec, or pass --force "
            "(force=True) to try anyway")


__all__ = ["AdapterTooLarge", "available_memory", "check_fits", "TRAINING_FACTOR"]
