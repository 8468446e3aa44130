"""Training on a ``[[freeze]]``-packed base: ``peftspec train`` (one process and two
under torchrun DDP give the same adapter), checkpoints that never hold the base,
resume that re-quantizes and continues with the losses of an uninterrupted run,
and FSDP's refusal, which names the limitation."""

from __future__ import annotations

import json

import pytest
import torch

import peftspec
from peftspec.core.errors import PeftspecError
from peftspec.core.packed import packed_parameters, stored_tensors
from peftspec.models.nanogpt import GPT, GPTConfig
from peftspec.core.train_config import TrainConfig
from peftspec.train.distributed import World
from peftspec.train.loop import train

pytest.importorskip("torchao")

SPEC = """
[[freeze]]
method = "nf4"
modules = ["**.q_proj", "**.k_proj", "**.v_proj", "**.o_proj", "**.up_proj", "**.down_proj"]
block_size = 32
scaler_block_size = 4
[[reparameterize]]
method = "lora"
modules = ["**.q_proj", "**.v_proj"]
r = 4
alpha = 8
"""


def tiny() -> GPT:
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i}: the tide came in again."}) + "\n"
                            for i in range(12)))
    return path


def test_resume_requantizes_and_matches_an_uninterrupted_run(tmp_path, data):
    spec = peftspec.parse_spec(SPEC)
    common = dict(data=str(data), steps=4, batch_size=2, max_length=24, lr=1e-2, seed=3)
    model = tiny()
    whole = train(spec, TrainConfig.resolve(**common), model=model,
                  out=tmp_path / "whole.safetensors")
    assert len(packed_parameters(model)) == 12
    ck = tmp_path / "ck"
    cfg = TrainConfig.resolve(checkpoint_dir=str(ck), **common)
    first = train(spec, cfg, model=tiny(), out=tmp_path / "unused.safetensors",
                  max_steps_this_run=2)
    assert first.interrupted
    from safetensors import safe_open

    for f in ck.rglob("*.safetensors"):  # never the base: adapter and optimizer only
        with safe_open(str(f), framework="pt") as h:
            assert all("lora_" in k or k.startswith(("state.", "param_groups")) or "." not in k
                       for k in h.keys()), (f, list(h.keys())[:5])
    resumed = tiny()
    rest = train(spec, cfg, model=resumed, out=tmp_path / "resumed.safetensors", resume=ck)
    assert first.losses + rest.losses == whole.losses  # exactly, step by step
    mine, ref = packed_parameters(resumed), packed_parameters(model)
    for n in ref:  # re-quantized to the very same bytes
        for k, v in stored_tensors(ref[n]).items():
            assert torch.equal(stored_tensors(mine[n])[k], v)
    a = (tmp_path / "whole.safetensors").read_bytes()
    assert (tmp_path / "resumed.safetensors").read_bytes() == a


def test_fsdp_refuses_a_packed_base_naming_the_limitation():
    model = tiny()
    peftspec.apply(peftspec.parse_spec(SPEC), model)
    with pytest.raises(PeftspecError, match="FSDP2's all-gather extension.*DDP"):
        World(rank=0, size=2, fsdp=True).prepare(model)


@pytest.mark.slow
def test_two_processes_under_ddp_train_the_one_process_adapter(tmp_path, data):
    from test_distributed import assert_same_tensors, peftspec_cmd, torchrun

    from click.testing import CliRunner

    from peftspec.cli import cli

    (tmp_path / "s.toml").write_text(SPEC)
    args = ["--data", str(data), "--steps", "2", "--batch-size", "4", "--max-length", "24",
            "--lr", "1e-2", "--seed", "3", "--precision", "fp32"]  # compared: not auto
    one = tmp_path / "one.safetensors"
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "s.toml"), *args, "--out", str(one)])
    assert r.exit_code == 0, r.output
    two = tmp_path / "two.safetensors"
    proc, outputs = torchrun(peftspec_cmd("train", tmp_path / "s.toml", *args, "--out", two),
                             tmp_path / "logs")
    assert proc.returncode == 0, (proc.stderr, outputs)
    assert_same_tensors(one, two)


@pytest.mark.parametrize("kind, extra", [
    ("nf4", "block_size = 32\nscaler_block_size = 4"), ("int8", ""), ("bf16", "")])
def test_bf16_training_over_a_packed_base_learns_and_keeps_the_base(tmp_path, data, kind, extra):
    # the LoRA's fused update met an fp32 packed-base output beside a bf16
    # after_a under autocast: auto picks bf16 on an AMX CPU, where this crashed
    spec = peftspec.parse_spec(SPEC.replace('"nf4"', f'"{kind}"').replace(
        "block_size = 32\nscaler_block_size = 4", extra))
    model = tiny()
    result = train(spec, TrainConfig.resolve(data=str(data), steps=6, batch_size=4,
                                             max_length=24, lr=1e-2, seed=3, precision="bf16"),
                   model=model, out=tmp_path / "a.safetensors")
    assert len(packed_parameters(model)) == 12
    assert all(map(torch.isfinite, map(torch.tensor, result.losses)))
    assert result.losses[-1] < result.losses[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randint(0, 257, (2, 8))).logits.isfinite().all()  # eval too
