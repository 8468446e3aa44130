"""Run a ``peftspec`` command and SIGKILL it at its N-th file-system step.

Usage: ``python tests/crashpoint.py N COUNT_FILE peftspec-args...``

Every write to a file opened for writing, ``os.fsync``, ``os.replace``,
``os.rename``, ``os.link``, ``os.unlink``, ``shutil.rmtree``, ``shutil.copy2``
and the atomic folder exchange counts as one step; at step ``N`` the process
kills itself with SIGKILL, before the step happens, as a power cut or the OOM
killer would. ``N = 0`` never kills and writes the number of steps to
``COUNT_FILE`` at exit, so a test can choose its kill points among them.
"""

from __future__ import annotations

import atexit
import builtins
import os
import shutil
import signal
import sys

STEPS = 0
KILL_AT = 0


def _tick() -> None:
    global STEPS
    STEPS += 1
    if STEPS == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def _counted(fn):
    def wrapper(*args, **kwargs):
        _tick()
        return fn(*args, **kwargs)
    return wrapper


class _Writer:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        _tick()
        return self._f.write(data)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _writing(mode) -> bool:
    return isinstance(mode, str) and any(c in mode for c in "wax+")


def _wrap_open(real):
    def opener(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        return _Writer(f) if _writing(mode) else f
    return opener


def arm(n: int) -> None:
    global KILL_AT
    KILL_AT = n
    for name in ("fsync", "replace", "rename", "link", "unlink"):
        setattr(os, name, _counted(getattr(os, name)))
    shutil.rmtree = _counted(shutil.rmtree)
    shutil.copy2 = _counted(shutil.copy2)
    builtins.open = _wrap_open(builtins.open)
    os.fdopen = _wrap_open(os.fdopen)
    import peftspec.core.atomicio as atomicio

    atomicio._exchange = _counted(atomicio._exchange)


if __name__ == "__main__":
    kill_at, count_file, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    arm(kill_at)

    def _report():
        with open(count_file, "w") as f:  # the wrapped open: counted, harmless
            f.write(str(STEPS))
    if kill_at == 0:
        atexit.register(_report)
    from peftspec.cli import main

    main(args)
