"""One process of a distributed test run (launched by tests/test_distributed.py
through torchrun): trains through the Python API under DDP and FSDP, straight
through and interrupted + resumed, and checks the frozen base on every rank.

Usage: torchrun --nproc_per_node=2 tests/distributed_worker.py OUT_DIR DATA SPEC_TOML

Starts the process group itself, so :func:`peftspec.train.loop.train` uses it
and leaves it open (the frozen check gathers FSDP shards after training).
Each rank writes ``OUT_DIR/rank{R}.json``; rank 0 writes the adapters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import peftspec
from peftspec.models.nanogpt import GPT, GPTConfig
from peftspec.core.train_config import TrainConfig
from peftspec.train.loop import train

COMMON = dict(steps=3, batch_size=4, grad_accum=2, max_length=32, lr=1e-2, eval_split=0.2,
              seed=3, precision="fp32")  # compared at 1e-5: not auto (bf16 on an AMX CPU)


def tiny() -> GPT:
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out_dir: str, data: str, spec_text: str) -> None:
    out = Path(out_dir)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = peftspec.parse_spec(Path(spec_text).read_text(), file=spec_text)
    report: dict = {"rank": rank}
    for mode in ("ddp", "fsdp"):
        fsdp = mode == "fsdp"
        model = tiny()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = TrainConfig.resolve(data=data, **COMMON)
        result = train(spec, cfg, model=model, out=out / f"{mode}.safetensors", fsdp=fsdp)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        params = dict(model.named_parameters())
        frozen = [n for n in before if n not in trainable]
        report[mode] = {
            "losses": result.losses, "eval_loss": result.eval_loss, "tokens": result.tokens,
            "frozen": len(frozen),
            "frozen_unchanged": all(torch.equal(whole(params[n]).cpu(), before[n])
                                    for n in frozen),
            "sharded": any(hasattr(p, "full_tensor") for p in params.values()),
        }
        # interrupted after one step, then resumed from its checkpoint
        ck = out / f"{mode}.checkpoints"
        cfg = TrainConfig.resolve(data=data, checkpoint_dir=str(ck), **COMMON)
        first = train(spec, cfg, model=tiny(), out=out / "unused.safetensors", fsdp=fsdp,
                      max_steps_this_run=1)
        rest = train(spec, cfg, model=tiny(), out=out / f"{mode}-resumed.safetensors",
                     resume=ck, fsdp=fsdp)
        report[mode]["resume"] = [first.interrupted, first.step, rest.step]
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
