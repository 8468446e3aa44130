"""The training-memory table of full fine-tuning against a spec, for
``peftspec memory`` and ``peftspec plan --memory``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from peftspec.core.train_config import OPTIONS
from peftspec.cli.common import human_bytes, load, out
from peftspec.core.patching import apply_plan
from peftspec.train import memory as mem
from peftspec.train.precision import resolve as resolve_precision


def prompt_tokens(plan) -> int:
    """Virtual tokens the plan's soft prompts add to every sequence."""
    return sum(int(getattr(step.options, "tokens", 0) or 0)
               for step in plan.steps if step.family == "prefix")


def memory_report(spec: Path, model_source: str | None, batch_size: int | None,
                  seq_len: int | None, precision: str | None,
                  gradient_checkpointing: bool | None, as_json: bool, loaded=None) -> None:
    """Print the memory table of full fine-tuning against SPEC (``as_json``: as JSON)."""
    table = memory_numbers(spec, model_source, batch_size, seq_len, precision,
                           gradient_checkpointing, loaded)
    if as_json:
        out.print_json(json.dumps(table))
    else:
        print_memory(table)


def memory_numbers(spec: Path, model_source: str | None, batch_size: int | None,
                   seq_len: int | None, precision: str | None,
                   gradient_checkpointing: bool | None, loaded=None) -> dict:
    """The memory table (:func:`peftspec.train.memory.memory_table`) for SPEC, with
    the spec's name; ``loaded``: what ``common.load`` returned, where the caller has it."""
    import torch


    reg, s, model, plan = loaded or load(spec, model_source)
    tc = s.train_config
    batch = batch_size or tc.get("batch_size", OPTIONS["batch_size"].default)
    seq = seq_len or tc.get("max_length", OPTIONS["max_length"].default)
    precision = precision or tc.get("precision", OPTIONS["precision"].default)
    precision = resolve_precision(precision)[0]  # auto: what training would choose here
    ckpt = gradient_checkpointing if gradient_checkpointing is not None \
        else tc.get("gradient_checkpointing", False)
    extra = prompt_tokens(plan)
    base = mem.full_finetune(model)
    with torch.random.fork_rng(devices=[]):
        apply_plan(plan, model, registry=reg)
    table = mem.memory_table(base, mem.with_spec(model), mem.model_dims(model), batch=batch,
                             seq=seq, precision=precision, checkpointing=ckpt,
                             spec_extra_tokens=extra)
    return {**table, "spec_name": s.name or str(spec)}


def print_memory(table: dict) -> None:
    """The table :func:`memory_numbers` returns, as a rich table."""
    batch, seq, precision = table["batch_size"], table["seq_len"], table["precision"]
    ckpt, extra = table["gradient_checkpointing"], table["spec_extra_tokens"]
    t = Table(title=f"training memory, batch {batch} x {seq} tokens, {precision}"
                    f"{', gradient checkpointing' if ckpt else ''}", title_justify="left")
    t.add_column("")
    t.add_column("full fine-tuning", justify="right")
    t.add_column(table["spec_name"], justify="right")
    cols = table["columns"]
    for key, label in (("weights", "weights"), ("gradients", "gradients"),
                       ("optimizer", "optimizer states (AdamW)"),
                       ("activations", "activations (estimate)"), ("total", "total")):
        t.add_row(label, *(human_bytes(cols[c][key]) if cols[c][key] is not None
                           else "unknown" for c in ("full", "spec")))
    t.add_row("trainable parameters", f"{cols['full']['trainable']:,}",
              f"{cols['spec']['trainable']:,}")
    notes = []
    if extra:
        notes.append(f"the spec's soft prompts add {extra} virtual tokens to each sequence")
    if table["dims"] is None:
        notes.append("activations unknown: the model's config names no layers/width/heads")
    if notes:
        t.caption = "; ".join(notes)
    out.print(t)
