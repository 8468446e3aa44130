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
