"""Distributed training: N processes under torchrun train the adapter one process trains.

The launched runs use gloo on the CPU, two processes, ``torchrun --standalone``
(a free port each time). FSDP2 (``fully_shard``) runs on the CPU with gloo in
the torch this project pins, so ``--fsdp`` is checked here the same way as DDP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from peftspec.cli import cli
from peftspec.data import examples as data
from peftspec.train.distributed import DistributedError, World

ROOT = Path(__file__).resolve().parent.parent

# LoRA without dropout (dropout masks cannot match across process counts), a
# [[train]] base parameter (the adapter file holds both kinds of tensor) and a
# soft prompt (the model scores one more token per row than the labels show)
SPEC = """
[spec]
name = "ddp"
[[train]]
params = ["**.ln1.bias"]
[[reparameterize]]
method = "lora"
modules = ["**.q_proj", "**.v_proj"]
r = 4
alpha = 8
[prefix]
method = "prompt-tuning"
tokens = 3
"""

# 16 examples of uneven length, some scoring only a completion: 3 held out, 13
# to train on, so with a global batch of 4 the last micro-batch has one row and
# rank 1 gets none of it
TRAIN = ["--steps", "2", "--batch-size", "4", "--grad-accum", "2", "--max-length", "32",
         "--lr", "1e-2", "--eval-split", "0.2", "--seed", "3",
         "--precision", "fp32"]  # compared at 1e-5: not auto, which is bf16 on an AMX CPU


@pytest.fixture
def setup(tmp_path):
    lines = [{"text": f"line {i}: the tide came in {'and out ' * (i % 4)}again."}
             for i in range(11)]
    lines += [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(5)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "s.toml").write_text(SPEC)
    return tmp_path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # one thread a process, as torchrun sets (conftest's PEFTSPEC_THREADS would win)
    return {**env, "OMP_NUM_THREADS": "1", "PEFTSPEC_THREADS": "1",
            "PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD": "1"}


def torchrun(args: list[str], logs: Path, nproc: int = 2, timeout: int = 240):
    """Run ``args`` (a command) under torchrun; returns (process, {rank: (stdout, stderr)})."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "--log-dir", str(logs), "--redirects", "3",
           "--no-python", "--", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    outputs = {}
    for rank in range(nproc):
        found = list(logs.glob(f"*/attempt_0/{rank}"))
        assert len(found) == 1, (proc.stdout, proc.stderr)
        outputs[rank] = ((found[0] / "stdout.log").read_text(),
                         (found[0] / "stderr.log").read_text())
    return proc, outputs


def peftspec_cmd(*args) -> list[str]:
    return [sys.executable, "-c", "from peftspec.cli import main; main()", *map(str, args)]


def assert_same_tensors(a: Path, b: Path, atol: float = 1e-5) -> float:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    worst = 0.0
    for key in ta:
        assert ta[key].shape == tb[key].shape, key
        torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=0, msg=key)
        worst = max(worst, float((ta[key] - tb[key]).abs().max()))
    return worst


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def one_process(setup: Path, name: str) -> Path:
    out = setup / f"{name}.safetensors"
    result = CliRunner().invoke(cli, ["train", str(setup / "s.toml"), "--data",
                                      str(setup / "d.jsonl"), *TRAIN, "--save-every", "1",
                                      "--log", str(setup / f"{name}.jsonl"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_the_one_process_adapter(setup, fsdp):
    one = one_process(setup, "one")
    two = setup / "two.safetensors"
    proc, outputs = torchrun(peftspec_cmd(
        "train", setup / "s.toml", "--data", setup / "d.jsonl", *TRAIN, "--save-every", "1",
        "--log", setup / "two.jsonl", "--out", two, *(["--fsdp"] if fsdp else [])),
        setup / "logs")
    assert proc.returncode == 0, (proc.stderr, outputs)
    worst = assert_same_tensors(one, two)
    print(f"max abs difference {'FSDP' if fsdp else 'DDP'} vs one process: {worst:.3g}")
    # the checkpoints too: adapter and AdamW state (gathered from shards under FSDP)
    for step in ("step-00000001", "step-00000002"):
        for f in ("adapter.safetensors", "optimizer.safetensors"):
            assert_same_tensors(setup / "one.checkpoints" / step / f,
                                setup / "two.checkpoints" / step / f)
        a, b = (json.loads((setup / c / step / "state.json").read_text())
                for c in ("one.checkpoints", "two.checkpoints"))
        assert a["data_position"] == b["data_position"] and a["tokens"] == b["tokens"]
    # one log, written once, with the global loss and token counts
    a, b = records(setup / "one.jsonl"), records(setup / "two.jsonl")
    assert [(r["type"], r["step"], r.get("tokens")) for r in a] == \
        [(r["type"], r["step"], r.get("tokens")) for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
    # rank 0 reports, rank 1 says nothing
    out0, err0 = outputs[0]
    assert "wrote" in out0 and out0.count("steps, final train loss") == 1
    assert "training" in err0 and "Traceback" not in err0
    assert outputs[1] == ("", "")


@pytest.mark.slow
def test_api_frozen_base_and_resume_under_ddp_and_fsdp(setup):
    from peftspec import parse_spec
    from peftspec.core.train_config import TrainConfig
    from peftspec.train.loop import train

    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import distributed_worker as worker
    finally:
        sys.path.pop(0)
    out = setup / "api"
    out.mkdir()
    proc, outputs = torchrun([sys.executable, str(ROOT / "tests" / "distributed_worker.py"),
                              str(out), str(setup / "d.jsonl"), str(setup / "s.toml")],
                             setup / "logs")
    assert proc.returncode == 0, (proc.stderr, outputs)
    cfg = TrainConfig.resolve(data=str(setup / "d.jsonl"), **worker.COMMON)
    single = train(parse_spec(SPEC, file="s.toml"), cfg, model=worker.tiny(),
                   out=out / "one.safetensors")
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for mode in ("ddp", "fsdp"):
        for rep in reports:
            r = rep[mode]
            assert r["frozen"] > 0 and r["frozen_unchanged"], (rep["rank"], mode)
            assert r["sharded"] == (mode == "fsdp")
            assert r["tokens"] == single.tokens
            assert r["losses"] == pytest.approx(single.losses, abs=1e-5)
            assert r["eval_loss"] == pytest.approx(single.eval_loss, abs=1e-5)
            assert r["resume"] == [True, 1, 3]
        assert_same_tensors(out / "one.safetensors", out / f"{mode}.safetensors")
        assert_same_tensors(out / "one.safetensors", out / f"{mode}-resumed.safetensors")
    assert not (out / "unused.safetensors").exists()  # interrupted runs write no adapter


def _batch(lengths: list[int], scored_from: list[int]) -> dict[str, torch.Tensor]:
    items = [(list(range(1, n + 1)), [data.IGNORE] * s + list(range(s + 1, n + 1)))
             for n, s in zip(lengths, scored_from)]
    return data.collate(items, pad_id=0)


def _scored(batch) -> int:
    return int((batch["labels"][:, 1:] != data.IGNORE).sum())


def test_shard_splits_rows_trims_padding_and_counts_scored_tokens():
    batch = _batch([9, 3, 5, 2], [0, 0, 3, 0])
    assert World().shard(batch, _scored) == (batch, _scored(batch), _scored(batch))
    parts = [World(rank=r, size=2).shard(batch, _scored) for r in (0, 1)]
    (p0, n0, all0), (p1, n1, all1) = parts
    assert all0 == all1 == _scored(batch) == n0 + n1
    assert p0["input_ids"].shape == (2, 9) and p1["input_ids"].shape == (2, 5)  # trimmed
    assert torch.equal(p1["labels"], batch["labels"][2:, :5])
    # a short last batch: rank 1 runs a stand-in row that counts for nothing
    short = _batch([4], [0])
    part, n, n_all = World(rank=1, size=2).shard(short, _scored)
    assert n == 0 and n_all == 3 and part["input_ids"].shape[0] == 1
    assert World(rank=1, size=2).share(part, short, None, n) == 0.0


def test_share_counts_tokens_as_the_model_scores_them():
    batch = _batch([9, 3, 5, 2], [0, 0, 3, 0])
    shares = []
    for rank in (0, 1):
        world = World(rank=rank, size=2)
        part, n, _ = world.shard(batch, _scored)
        width = part["labels"].shape[1]
        plain = SimpleNamespace(logits=torch.zeros(2, width, 7))
        assert world.share(part, batch, plain, n) == n / _scored(batch)
        # prompt tuning puts 4 virtual tokens in front: each row's first real
        # token becomes scored (rows 0, 1, 3: their first label is not -100)
        prompted = SimpleNamespace(logits=torch.zeros(2, width + 4, 7))
        shares.append(world.share(part, batch, prompted, n))
    assert _scored(batch) == 8 + 2 + 2 + 1
    assert shares == [(9 + 3) / 16, (2 + 2) / 16]
    assert World().share(batch, batch, None, 13) == 1.0


def test_global_batch_must_split_evenly():
    World(size=2).check_batch_size(4)
    with pytest.raises(DistributedError, match=r"--batch-size 6 is the global batch.*"
                                               r"multiple of 4, e.g. --batch-size 8"):
        World(size=4).check_batch_size(6)


def test_fsdp_needs_torchrun(setup, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(cli, ["train", str(setup / "s.toml"), "--data",
                                      str(setup / "d.jsonl"), "--fsdp", "--steps", "1",
                                      "--out", str(setup / "a.safetensors")])
    assert result.exit_code == 2, result.output
    assert "--fsdp" in result.output and "torchrun --nproc_per_node" in result.output
