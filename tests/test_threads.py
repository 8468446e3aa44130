"""Threads (issue 25, point 5): torch's kernels use the cores this process may
run on, or the count a user asks for."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from peftspec.core import threads


def test_cores_is_the_affinity_within_a_quota(tmp_path, monkeypatch):
    assert threads.cores() == len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert threads._quota(quota) == 2
    quota.write_text("max 100000\n")
    assert threads._quota(quota) is None
    monkeypatch.setattr(threads, "_quota", lambda: 1)
    assert threads.cores() == 1


def test_the_count_explicit_then_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "_recent_free", lambda: None)
    assert threads.wanted() == threads.cores()
    assert threads.wanted(3) == 3
    monkeypatch.setenv(threads.ENV, "1")
    assert threads.wanted() == 1 and threads.wanted(2) == 2
    monkeypatch.setenv(threads.ENV, "none")
    with pytest.raises(ValueError, match="PEFTSPEC_THREADS='none'"):
        threads.wanted()
    monkeypatch.delenv(threads.ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's: left to torch
    assert threads.wanted() is None


def test_use_sets_torchs_threads():
    before = torch.get_num_threads()
    try:
        assert threads.use(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_process_pinned_to_one_core_runs_one_thread():
    """taskset-style affinity: torch alone would size its pool from the machine."""
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from peftspec.core import threads; print(threads.use())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", threads.ENV)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "1"


def test_train_threads_option(tmp_path):
    """``peftspec train --threads 1`` runs with one thread (end to end)."""
    from click.testing import CliRunner

    from peftspec.cli import cli

    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(cli, [
            "train", "specs/train-lora.toml", "--data", "data/brindlecombe-train.jsonl",
            "--steps", "1", "--batch-size", "2", "--max-length", "64", "--threads", "1",
            "--out", str(tmp_path / "a.safetensors")])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cores_that_others_keep_busy_are_left_to_them(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "cores", lambda: 2)
    monkeypatch.setattr(threads, "_recent_free", lambda: 1.05)  # one busy process
    assert threads.wanted() == 1
    monkeypatch.setattr(threads, "_recent_free", lambda: 1.9)
    assert threads.wanted() == 2
    monkeypatch.setattr(threads, "_recent_free", lambda: 0.0)  # never below one
    assert threads.wanted() == 1
    stat = tmp_path / "stat"
    stat.write_text("cpu  9 0 9 90 0 0 0 0 0 0\ncpu0 1 0 1 8 2 0 0 0 0 0\nintr 5\n")
    assert threads._cpu_times(stat) == {0: (10, 12)}


def test_free_cores_sees_a_busy_process():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU")
    cpu = sorted(os.sched_getaffinity(0))[0]
    busy = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\n"
                             "while True: pass"])
    try:
        import time
        time.sleep(0.3)
        free = threads.free_cores(0.3)
    finally:
        busy.kill()
    assert free is not None and free < len(os.sched_getaffinity(0)) - 0.5
