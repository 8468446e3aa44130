"""Crash consistency: SIGKILL at random moments of train (with checkpoints),
merge (streamed, several shards) and export. Afterwards the previous outputs
are intact, no partial file stands under a final name (temporary names begin
with a dot), and ``train --resume`` continues exactly: the final adapter is
bit-identical to an uninterrupted run's.

train is killed at random wall-clock moments; merge and export, which are
over in a blink, at random file-system steps (tests/crashpoint.py), chosen
among the steps a full run takes. Every kill point comes from a seeded
generator, so a failure replays.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
PEFTSPEC = [str(Path(sys.executable).with_name("peftspec"))]  # the venv's console script
CRASH = [sys.executable, str(Path(__file__).with_name("crashpoint.py"))]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)}


def visible(folder: Path) -> list[str]:
    """Names under ``folder`` that are not temporary (a dot), recursively."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def assert_whole_safetensors(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            f.get_tensor(k)


# --- train -----------------------------------------------------------------------------

TRAIN = ["train", str(ROOT / "specs" / "train-lora.toml"), "--data",
         str(ROOT / "data" / "harbour.txt"), "--steps", "16", "--save-every", "2",
         "--batch-size", "2", "--max-length", "48", "--seed", "3"]


def check_checkpoints(ckpt: Path) -> None:
    """Every checkpoint under a final name is whole; 'latest' names one."""
    from peftspec.train import resume as checkpoint

    if not ckpt.exists():
        return
    for step in sorted(ckpt.glob("step-*")):
        assert {p.name for p in step.iterdir()} >= {"adapter.safetensors",
                                                   "optimizer.safetensors", "state.json"}
        checkpoint.read_state(step)
        assert_whole_safetensors(step / "adapter.safetensors")
        assert_whole_safetensors(step / "optimizer.safetensors")
    if (ckpt / "latest").exists():
        assert (ckpt / (ckpt / "latest").read_text().strip() / "state.json").is_file()


@pytest.mark.slow
def test_train_killed_at_random_moments_resumes_bit_identically(tmp_path):
    ref = tmp_path / "ref.safetensors"
    t0 = time.perf_counter()
    subprocess.run(PEFTSPEC + TRAIN + ["--out", str(ref)], env=ENV, check=True,
                   capture_output=True)
    full = time.perf_counter() - t0
    out, ckpt = tmp_path / "run.safetensors", tmp_path / "run.checkpoints"
    rng = random.Random(12)
    kills = 0
    for attempt in range(3):
        args = PEFTSPEC + TRAIN + ["--out", str(out)]
        if (ckpt / "latest").exists():
            args += ["--resume", str(ckpt)]
        latest = (ckpt / "latest").read_text() if (ckpt / "latest").exists() else None
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Wall time says little on a loaded box: kill at a random moment after the
        # run has written a checkpoint of its own (so each kill loses some work).
        while proc.poll() is None and ((ckpt / "latest").read_text() if (ckpt / "latest")
                                       .exists() else None) == latest:
            time.sleep(0.02)
        wait = rng.uniform(0.0, 0.08) * full
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        check_checkpoints(ckpt)
        if out.exists():  # only ever the whole, final adapter
            assert out.read_bytes() == ref.read_bytes()
        assert visible(tmp_path) == sorted(visible(tmp_path))  # listing is readable
    args = PEFTSPEC + TRAIN + ["--out", str(out)]
    if (ckpt / "latest").exists():
        args += ["--resume", str(ckpt)]
    subprocess.run(args, env=ENV, check=True, capture_output=True)
    print(f"\ntrain: {kills} SIGKILLs at random moments, then --resume to the end")
    assert kills >= 2, "the runs finished before the kills: the test did not test"
    assert out.read_bytes() == ref.read_bytes(), "resumed run differs from an uninterrupted one"


# --- merge and export ------------------------------------------------------------------

def steps_of(args: list[str], tmp_path: Path) -> int:
    count = tmp_path / "steps.txt"
    subprocess.run(CRASH + ["0", str(count)] + args, env=ENV, check=True,
                   capture_output=True)
    return int(count.read_text())


def killed_at(n: int, args: list[str], tmp_path: Path) -> int:
    r = subprocess.run(CRASH + [str(n), str(tmp_path / "unused.txt")] + args, env=ENV,
                       capture_output=True)
    return r.returncode


def kill_points(total: int, seed: int, k: int = 4) -> list[int]:
    rng = random.Random(seed)
    return sorted(set(rng.sample(range(1, total + 1), min(k, total)) + [total]))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    pytest.importorskip("transformers")
    from click.testing import CliRunner

    from peftspec.cli import cli
    from test_hf_format import LLAMA

    base = tmp_path_factory.mktemp("sharded") / "base"
    LLAMA.base().save_pretrained(base, max_shard_size="40KB")
    assert len(list(base.glob("*.safetensors"))) >= 3
    spec = base.parent / "s.toml"
    spec.write_text('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.o_proj"]'
                    '\nr = 2\ninit = "gaussian"\n')
    lora = base.parent / "l.safetensors"
    r = CliRunner().invoke(cli, ["apply", str(spec), "--model", f"hf:{base}", "--out",
                                 str(lora)])
    assert r.exit_code == 0, r.output
    return base, lora


@pytest.mark.slow
def test_streamed_merge_killed_anywhere_leaves_old_or_new_output(sharded, tmp_path):
    base, lora = sharded
    fresh = tmp_path / "fresh"
    args = ["merge", "--model", f"hf:{base}", "--adapter", str(lora)]
    subprocess.run(PEFTSPEC + args + ["--out", str(fresh)], env=ENV, check=True,
                   capture_output=True)
    new = snapshot(fresh)
    dest = tmp_path / "work"
    dest.mkdir()
    out = dest / "merged"
    total = steps_of(args + ["--out", str(tmp_path / "count")], tmp_path)
    points = kill_points(total, seed=5)
    print(f"\nstreamed merge: {total} file-system steps; SIGKILL at steps {points}")
    for n in points:
        old = {"note.txt": f"previous merge {n}".encode()}
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        (out / "note.txt").write_bytes(old["note.txt"])
        code = killed_at(n, args + ["--out", str(out)], tmp_path)
        assert code == -signal.SIGKILL, (n, code)
        now = snapshot(out)
        assert now in (old, new), f"killed at step {n} of {total}: a mixed folder"
        assert visible(dest) == sorted(["merged"] + [f"merged/{k}" for k in now]), n


@pytest.mark.slow
def test_export_killed_anywhere_leaves_old_or_new_folder(sharded, tmp_path):
    base, lora = sharded
    fresh = tmp_path / "fresh"
    args = ["export", str(lora), "--model", f"hf:{base}"]
    subprocess.run(PEFTSPEC + args + ["--out", str(fresh)], env=ENV, check=True,
                   capture_output=True)
    new = snapshot(fresh)
    dest = tmp_path / "work"
    dest.mkdir()
    out = dest / "hf"
    total = steps_of(args + ["--out", str(tmp_path / "count")], tmp_path)
    points = kill_points(total, seed=9)
    print(f"\nexport: {total} file-system steps; SIGKILL at steps {points}")
    for n in points:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        # an older export beside a README the user keeps there
        (out / "README.md").write_bytes(b"mine")
        (out / "adapter_config.json").write_bytes(b'{"old": true}')
        old = snapshot(out)
        code = killed_at(n, args + ["--out", str(out)], tmp_path)
        assert code == -signal.SIGKILL, (n, code)
        now = snapshot(out)
        assert now == old or now == {**new, "README.md": b"mine"}, \
            f"killed at step {n} of {total}: {sorted(now)}"
        assert all(not name.startswith(".") for name in os.listdir(out))
