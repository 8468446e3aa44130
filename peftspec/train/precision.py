"""Which compute precision ``precision = "auto"`` (the default) trains in.

The rule: bf16 autocast where bf16 is native and pays, fp32 elsewhere.

* CUDA: bf16 when the device supports it (``torch.cuda.is_bf16_supported``:
  Ampere and later), which is where its tensor cores are.
* CPU: bf16 only when the CPU advertises bf16 instructions (``avx512_bf16`` or
  ``amx_bf16`` in ``/proc/cpuinfo``) *and* a bf16 matmul of a transformer's
  shapes, timed here once per process (about 0.1 s), runs at least
  :data:`GAIN` times the speed of fp32. The flag alone is not enough: on one
  of this project's machines (a virtualised Xeon advertising ``avx512_bf16``)
  bf16 matmuls measured half the speed of fp32, so ``auto`` keeps fp32 there;
  on another (a Xeon with AMX) 6-7x, so ``auto`` picks bf16.
* Anything else (MPS, no flag, not faster): fp32.

bf16 here is autocast: the weights stay as loaded, the LoRA factors and the
optimizer's state stay fp32 (master weights). ``precision = "fp32"`` or
``"bf16"`` in ``[train_config]``, or ``--precision``, overrides the rule; the
run's log and output say which was chosen and why.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from peftspec.train import resume as ckpt

GAIN = 1.15  # bf16 must beat fp32 by this much to be chosen on a CPU
_CHOSEN: dict[str, tuple[str, str]] = {}  # device type -> (precision, why), per process


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where unknown: not Linux)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _rate(dtype: torch.dtype, m: int = 256, k: int = 576, n: int = 1536, reps: int = 6) -> float:
    """Matmul GFLOP/s at a SmolLM2-sized projection, best of ``reps``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: kernels picked, memory touched
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def measured_gain() -> float:
    """How many times faster a bf16 matmul runs than fp32 on this CPU."""
    return _rate(torch.bfloat16) / _rate(torch.float32)


def choose(device: torch.device | str = "cpu") -> tuple[str, str]:
    """``(precision, why)`` for training on ``device`` under ``auto``."""
    kind = torch.device(device).type
    if kind in _CHOSEN:
        return _CHOSEN[kind]
    if kind == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        out = ("bf16", "CUDA device with bf16") if ok else ("fp32", "CUDA device without bf16")
    elif kind == "cpu":
        flags = cpu_flags() & {"avx512_bf16", "amx_bf16"}
        if not flags:
            out = ("fp32", "this CPU has no native bf16 (avx512_bf16/amx_bf16)")
        else:
            gain = measured_gain()
            have = "/".join(sorted(flags))
            out = (("bf16", f"{have}, bf16 matmul measured {gain:.2f}x fp32") if gain >= GAIN
                   else ("fp32", f"{have}, but bf16 matmul measured only {gain:.2f}x fp32"))
    else:
        out = ("fp32", f"no bf16 rule for {kind} devices")
    _CHOSEN[kind] = out
    return out


def resolve(precision: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """``(precision, why)``: ``precision`` itself unless it is ``auto``."""
    if precision != "auto":
        return precision, "set in the spec or on the command line"
    return choose(device)


def for_run(precision: str, resume_folder: Path | None, model) -> tuple[str, str]:
    """``(precision, why)`` for a training run: ``auto`` chosen for the model's
    device, except that a resumed run keeps the precision its checkpoint
    trained in, wherever it resumes."""
    if precision != "auto":
        return resolve(precision)
    if resume_folder is not None:
        saved = ckpt.read_state(resume_folder).get("config", {}).get("precision")
        if saved in ("fp32", "bf16"):
            return saved, "auto: the checkpoint's"
    chosen, why = choose(next(model.parameters()).device)
    return chosen, f"auto: {why}"


__all__ = ["GAIN", "choose", "cpu_flags", "for_run", "measured_gain", "resolve"]
