"""``peftspec train`` on a quantized base fixes glibc's mmap threshold, so that
activation-sized blocks are mapped and returned on free instead of
fragmenting the heap (see peftspec/train/allocator.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, torch
from peftspec.train.allocator import fix_mmap_threshold
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def mapped():
    big = torch.empty(30 << 18)  # 30 MiB, mapped, then freed: glibc's threshold grows to it
    del big
    before = libc.mallinfo2().hblks
    keep = torch.empty(1 << 19)  # 2 MiB
    return libc.mallinfo2().hblks - before, keep
n, kept = mapped()  # kept alive: a free heap chunk would serve the next block
print("default", n)
print("set", fix_mmap_threshold())
print("fixed", mapped()[0])
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc >= 2.33 only")
def test_a_fixed_threshold_maps_blocks_the_dynamic_one_would_take_from_the_heap():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    # the grown threshold takes 2 MiB from the heap; the fixed one maps it
    assert out == ["default", "0", "set", "True", "fixed", "1"]


def test_the_users_own_glibc_setting_is_left_alone(monkeypatch):
    from peftspec.train.allocator import fix_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False


def test_train_fixes_it_only_for_a_spec_with_freeze_rules(monkeypatch):
    import peftspec
    from peftspec.train import allocator, loop

    calls = []
    monkeypatch.setattr(allocator, "fix_mmap_threshold", lambda *a: calls.append(a) or True)

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(loop, "Run", stop)
    from peftspec.core.train_config import TrainConfig

    cfg = TrainConfig.resolve(data="data/harbour.txt", steps=1)
    for text, expected in (('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n', 0),
                           ('[[freeze]]\nmethod = "bf16"\nmodules = ["**.q_proj"]\n'
                            '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n', 1)):
        calls.clear()
        with pytest.raises(Stop):
            loop.train(peftspec.parse_spec(text), cfg)
        assert len(calls) == expected
