"""Resumable training checkpoints, written atomically, nothing pickled.

A checkpoint is a folder ``DIR/step-00000012/`` holding:

``adapter.safetensors``
    the adapter, as :func:`peftspec.save_adapter` writes it (a usable
    adapter file on its own: spec, base fingerprint and tensors);
``optimizer.safetensors``
    AdamW's state flattened per parameter name: ``exp_avg/NAME``,
    ``exp_avg_sq/NAME`` and ``step/NAME`` (a scalar), with the parameter
    groups' names and hyperparameters as JSON metadata;
``state.json``
    the scalars: optimizer step, tokens seen, data order position
    (epoch, micro-batch), the RNG states of torch (base64) and Python's
    ``random``, the schedule's settings, the options that shape the run's
    trajectory and the data file's SHA-256 (a resumed run must match them).

The folder is built under a temporary name and renamed into place, then
``DIR/latest`` is replaced (atomically) with its name, so a crash mid-write
leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from peftspec.formats.adapter_file import save_adapter
from peftspec.core.atomicio import atomic_write_bytes, replace_dir, staging_dir, writing
from peftspec.core.errors import PeftspecError
from peftspec.core.untrusted import BadText, json_loads
from peftspec.core.safetensors_io import serialize

FORMAT = "peftspec.train-checkpoint"
VERSION = 1


class CheckpointError(PeftspecError):
    """A checkpoint is missing, malformed or does not fit this run (exit code 2)."""

    exit_code = 2


def rng_state() -> dict:
    py = random.getstate()
    return {"torch": base64.b64encode(bytes(torch.get_rng_state().tolist())).decode(),
            "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def optimizer_tensors(optimizer: torch.optim.Optimizer,
                      names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """AdamW's state as named tensors plus metadata (``names``: id(param) -> name)."""
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            name = names[id(p)]
            for key, value in st.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                tensors[f"{key}/{name}"] = t.detach()
    return tensors, {"param_groups": json.dumps(groups, sort_keys=True)}


def load_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], path: Path) -> None:
    """Fill ``optimizer``'s state from ``optimizer.safetensors`` at ``path``."""
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            kind, _, name = key.partition("/")
            by_name.setdefault(name, {})[kind] = f.get_tensor(key)
    try:
        saved_groups = json_loads(meta.get("param_groups", "[]"))
    except BadText as exc:
        raise CheckpointError(f"{path}: 'param_groups' metadata is not JSON ({exc})") from None
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if not isinstance(saved_groups, list) or \
            [g.get("params") if isinstance(g, dict) else g for g in saved_groups] != current:
        raise CheckpointError(f"{path}: the checkpoint's trainable parameters differ from "
                              "this run's (was the spec changed?)")
    state_dict = optimizer.state_dict()
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = by_name.get(names[id(p)])
            if st:
                state_dict["state"][index] = st
            index += 1
    optimizer.load_state_dict(state_dict)


def save(directory: Path, *, step: int, model, optimizer, names: dict[int, str],
         state: dict, adapter_tensors: dict[str, torch.Tensor] | None = None,
         optimizer_state: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None,
         adapter_metadata: dict[str, str] | None = None) -> Path:
    """Write checkpoint ``step`` under ``directory``; returns its folder.

    ``adapter_tensors`` / ``optimizer_state``: what to write instead of the
    model's and the optimizer's own tensors (a sharded run passes them gathered).
    ``adapter_metadata``: extra header entries of the adapter file (a classifier's
    task and labels).
    """
    final = directory / f"step-{step:08d}"
    tmp = staging_dir(final)
    try:
        save_adapter(model, tmp / "adapter.safetensors", tensors=adapter_tensors,
                     metadata=adapter_metadata)
        tensors, meta = optimizer_state or optimizer_tensors(optimizer, names)
        atomic_write_bytes(tmp / "optimizer.safetensors", serialize(tensors, meta))
        body = {"format": FORMAT, "version": VERSION, "step": step, **state,
                "rng": rng_state()}
        atomic_write_bytes(tmp / "state.json",
                           (json.dumps(body, sort_keys=True) + "\n").encode())
        with writing(final):
            replace_dir(tmp, final)  # a checkpoint written again (resumed runs) swaps whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(directory / "latest", (final.name + "\n").encode())
    return final


def find(path: Path) -> Path:
    """The checkpoint folder ``path`` names: itself, or the latest one under it."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        found = path / latest.read_text().strip()
        if (found / "state.json").is_file():
            return found
    raise CheckpointError(f"{path}: not a checkpoint, nor a folder with a 'latest' checkpoint")


def read_state(folder: Path) -> dict:
    try:
        state = json_loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, BadText) as exc:
        raise CheckpointError(f"{folder / 'state.json'}: unreadable ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or \
            state.get("version") != VERSION:
        raise CheckpointError(f"{folder}: not a peftspec training checkpoint of version "
                              f"{VERSION}")
    return state
