"""A full disk and a read-only destination, for every command that writes:
apply, train, merge (streamed and in memory), export, import. Each must exit
non-zero with one line naming the path and the bytes needed, leave the
previous output as it was, and leave no file behind.

The disks are small tmpfs mounts (root only, as CI runs); where mounting is
impossible the tests skip. Writes failing inside peftspec's own code are
also checked without a mount, by injecting ENOSPC (tests/test_adapter_file.py).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import peftspec
from peftspec.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "lora.toml"
DATA = ROOT / "data" / "harbour.txt"
PREVIOUS = b"previous output, must survive"


def _mount(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'not root'})")


def _remount_ro(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


@pytest.fixture
def disk(tmp_path):
    """A 600 KiB filesystem; filled on request, leaving ``free`` bytes."""
    mnt = tmp_path / "disk"
    _mount(mnt, "600k")

    class Disk:
        path = mnt

        def fill(self, free: int) -> None:
            st = os.statvfs(mnt)
            left = st.f_bavail * st.f_frsize - free
            if left > 0:
                with open(mnt / ".filler", "wb") as f:
                    f.write(b"\0" * left)

        def readonly(self) -> None:
            _remount_ro(mnt)

        def listing(self) -> list[str]:
            return sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*")
                          if p.name != ".filler")

    yield Disk()
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, path: Path, *, needs_bytes: bool = True) -> str:
    assert r.exit_code == 1, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr  # one line, the last
    line = errors[0]
    assert line.startswith("error: cannot write ") and str(path) in line, line
    if needs_bytes:
        assert " bytes)" in line and "it needs " in line, line
    return line


# --- the outputs each command writes, and how to run it --------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adapter") / "a.safetensors"
    assert invoke("apply", SPEC, "--out", path).exit_code == 0
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama saved in several shards, and a LoRA adapter for it."""
    transformers = pytest.importorskip("transformers")
    from test_hf_format import LLAMA

    folder = tmp_path_factory.mktemp("llama") / "base"
    LLAMA.base().save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) >= 3
    spec = folder.parent / "s.toml"
    spec.write_text('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\nr = 2\n')
    lora = folder.parent / "l.safetensors"
    assert invoke("apply", spec, "--model", f"hf:{folder}", "--out", lora).exit_code == 0
    assert transformers
    return folder, lora


def _hf_peft_folder(tmp_path) -> Path:
    peft = pytest.importorskip("peft")
    from test_hf_format import LLAMA, hf_adapter

    src = tmp_path / "hf-src"
    hf_adapter(LLAMA, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"), src)
    return src


def _previous_file(path: Path) -> None:
    path.write_bytes(PREVIOUS)


def _previous_folder(path: Path) -> None:
    path.mkdir()
    (path / "keep.txt").write_bytes(PREVIOUS)


def _check_previous_file(path: Path) -> None:
    assert path.read_bytes() == PREVIOUS


def _check_previous_folder(path: Path) -> None:
    assert sorted(p.name for p in path.iterdir()) == ["keep.txt"]
    assert (path / "keep.txt").read_bytes() == PREVIOUS


CASES = ["apply", "train", "merge-in-memory", "merge-streamed", "export", "import"]


def _run(case: str, dest: Path, adapter: Path, llama, tmp_path):
    """Run command ``case`` writing into ``dest``; return (result, output path, kind)."""
    if case == "apply":
        out = dest / "a.safetensors"
        return invoke("apply", SPEC, "--out", out), out, "file"
    if case == "train":
        out = dest / "t.safetensors"
        return invoke("train", ROOT / "specs" / "train-lora.toml", "--out", out, "--steps", "1",
                      "--batch-size", "2", "--max-length", "32", "--data", DATA), out, "file"
    if case == "merge-in-memory":
        out = dest / "merged"
        return invoke("merge", "--adapter", adapter, "--out", out), out, "folder"
    if case == "merge-streamed":
        base, lora = llama
        out = dest / "merged"
        return invoke("merge", "--model", f"hf:{base}", "--adapter", lora, "--out", out), out, \
            "folder"
    if case == "export":
        out = dest / "hf"
        return invoke("export", adapter, "--out", out), out, "folder"
    if case == "import":
        from test_hf_format import LLAMA

        base = tmp_path / "llama-base"
        if not base.exists():
            LLAMA.base().save_pretrained(base)
        out = dest / "i.safetensors"
        return invoke("import", _hf_peft_folder(tmp_path), "--out", out, "--spec-out",
                      dest / "i.toml", "--model", f"hf:{base}"), out, "file"
    raise AssertionError(case)


def _output_of(case, dest):
    return {"apply": dest / "a.safetensors", "train": dest / "t.safetensors",
            "merge-in-memory": dest / "merged", "merge-streamed": dest / "merged",
            "export": dest / "hf", "import": dest / "i.safetensors"}[case]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fault", ["full disk", "read-only"])
def test_fault_leaves_previous_output_and_names_path(case, fault, disk, adapter, llama,
                                                     tmp_path):
    out = _output_of(case, disk.path)
    folder = case.startswith("merge") or case == "export"
    (_previous_folder if folder else _previous_file)(out)
    before = disk.listing()
    if fault == "full disk":
        disk.fill(free=4096)
    else:
        disk.readonly()
    r, out, kind = _run(case, disk.path, adapter, llama, tmp_path)
    # the bytes needed are named wherever they are known before writing: always on a
    # full disk; on a read-only one, where the size is known up front
    line = one_line_error(r, out, needs_bytes=fault == "full disk")
    assert ("no space left on device" if fault == "full disk" else "read-only file system") \
        in line, line
    (_check_previous_folder if kind == "folder" else _check_previous_file)(out)
    assert disk.listing() == before, "a temporary or partial file was left behind"


def test_enospc_without_a_mount_names_path_and_bytes(tmp_path, monkeypatch):
    """The same message when the failure is injected (any machine, any user)."""
    from peftspec.core.atomicio import WriteError, atomic_write_bytes

    target = tmp_path / "x.bin"
    target.write_bytes(PREVIOUS)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError) as exc:
        atomic_write_bytes(target, b"x" * 5000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert str(exc.value).startswith(f"cannot write {target}: no space left on device; it "
                                     "needs 4.9 KiB (5,000 bytes)")
    assert target.read_bytes() == PREVIOUS
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    assert exc.value.exit_code == 1 and isinstance(exc.value, peftspec.PeftspecError)
