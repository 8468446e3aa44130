"""Training options: one schema shared by the CLI and a spec's ``[train_config]``.

A spec may carry defaults for ``peftspec train`` in a ``[train_config]`` table;
the command line wins over it, and it wins over the defaults here. The spec
loader validates the table against :data:`OPTIONS` (no torch needed), so a
misspelled key is reported with its file and line like every other spec error.

Paths in ``[train_config]`` (``data``, ``eval``) are relative to the spec file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Opt:
    """One option: its type, default, a range check and its help text."""

    type: type
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    several: bool = False  # a list of values, or one (the CLI option may repeat)


OPTIONS: dict[str, Opt] = {
    "data": Opt(str, None, "training data: files or globs (repeat the option for several): "
                           "JSONL, JSON, CSV/TSV, Parquet, a datasets folder, or .txt; "
                           "records {\"messages\"}, {\"prompt\",\"completion\"}, "
                           "{\"text\"} or {\"text\",\"label\"} (docs/data.md)",
                several=True),
    "eval": Opt(str, None, "evaluation data, same formats as --data", several=True),
    "loss_on": Opt(str, "assistant", "which tokens of a conversation are scored: every "
                                     "assistant turn, the last one, or all tokens",
                   choices=("assistant", "last_assistant", "all")),
    "chat_template": Opt(str, None, "a jinja chat template file to render conversations "
                                    "with, instead of the tokenizer's own"),
    "truncation": Opt(str, "right", "an example longer than max_length: cut it (right), "
                                    "leave it out (drop), or stop (error)",
                      choices=("right", "drop", "error")),
    "skip_bad_records": Opt(bool, False, "leave malformed records out (counted) instead of "
                                         "stopping"),
    "packing": Opt(bool, False, "lay several examples end to end in each row of max_length "
                                "tokens, each attending only to itself (causal LM)"),
    "streaming": Opt(str, "auto", "read --data as training goes, tokenized ahead on a worker, "
                                  "instead of whole before the first step: auto (JSON Lines "
                                  "data over 256 MiB), on, off (docs/data.md)",
                     choices=("auto", "on", "off")),
    "eval_split": Opt(float, 0.0, "hold out this fraction of --data for evaluation", 0.0, 0.9),
    "eval_every": Opt(int, 0, "evaluate every N optimizer steps (0: only at the end)", 0),
    "epochs": Opt(int, 1, "passes over the data (ignored when steps is given)", 1),
    "steps": Opt(int, 0, "optimizer steps to run in all (0: from epochs)", 0),
    "batch_size": Opt(int, 8, "examples per micro-batch; under torchrun the global batch, "
                              "split evenly over the processes", 1),
    "grad_accum": Opt(int, 1, "micro-batches per optimizer step", 1),
    "lr": Opt(float, 1e-3, "peak learning rate (AdamW)", 0.0),
    "warmup": Opt(int, 0, "linear warmup steps before the cosine decay", 0),
    "min_lr_ratio": Opt(float, 0.0, "the cosine decays to lr * this", 0.0, 1.0),
    "weight_decay": Opt(float, 0.0, "AdamW weight decay (on tensors of 2+ dimensions)", 0.0),
    "clip": Opt(float, 1.0, "clip the gradient norm to this (0: no clipping)", 0.0),
    "seed": Opt(int, 0, "seed for the adapter's init, data order and dropout"),
    "max_length": Opt(int, 128, "truncate examples to this many tokens", 2),
    "gradient_checkpointing": Opt(bool, False, "recompute activations in backward"),
    "precision": Opt(str, "auto", "auto (bf16 autocast where bf16 is native and measured "
                                  "faster, else fp32: peftspec.train.precision), fp32, or "
                                  "bf16 autocast (weights stay as loaded)",
                     choices=("auto", "fp32", "bf16")),
    "fused_loss": Opt(bool, True, "a causal LM's head and cross-entropy only at the scored "
                                  "positions, a chunk at a time (false: the model's own loss "
                                  "over every position; the same value either way)"),
    "threads": Opt(int, 0, "CPU threads for torch's kernels (0: the cores this process may "
                           "use, or PEFTSPEC_THREADS)", 0),
    "save_every": Opt(int, 0, "write a checkpoint every N optimizer steps (0: never)", 0),
    "checkpoint_dir": Opt(str, None, "folder for checkpoints (default: OUT with "
                                     "'.checkpoints' for its suffix)"),
    "log": Opt(str, None, "write one JSON line per step and per evaluation here"),
    "loraplus_lr_ratio": Opt(float, None, "LoRA+: train LoRA's B factors (and 1-D adapter "
                                          "tensors) at lr * this (the paper suggests 16)", 1.0),
    "loraplus_lr_embedding": Opt(float, 1e-6, "LoRA+: the learning rate of LoRA on "
                                              "embeddings (only with loraplus_lr_ratio)", 0.0),
}

PATH_KEYS = ("data", "eval", "checkpoint_dir", "log", "chat_template")


def check_value(key: str, value: Any) -> str | None:
    """Why ``value`` is not valid for option ``key`` (None when it is)."""
    opt = OPTIONS[key]
    if opt.several and isinstance(value, (list, tuple)):
        if not value:
            return "expected a string or a non-empty list of strings, got []"
        return next((p for p in (check_value(key, v) for v in value) if p), None) \
            if all(isinstance(v, str) for v in value) else \
            f"expected a string or a list of strings, got {value!r}"
    if opt.type is bool:
        if not isinstance(value, bool):
            return f"expected true or false, got {value!r}"
        return None
    if opt.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {value!r}"
    elif opt.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {value!r}"
    elif opt.type is str:
        if not isinstance(value, str):
            return f"expected a string, got {value!r}"
        if opt.choices and value not in opt.choices:
            return f"expected one of {', '.join(opt.choices)}, got {value!r}"
        return None
    if opt.min is not None and value < opt.min:
        return f"must be at least {opt.min:g}, got {value!r}"
    if opt.max is not None and value > opt.max:
        return f"must be at most {opt.max:g}, got {value!r}"
    return None


@dataclass(frozen=True)
class TrainConfig:
    """Every training option, resolved (defaults < spec ``[train_config]`` < CLI)."""

    data: str | tuple[str, ...] | None = None  # several: a tuple
    eval: str | tuple[str, ...] | None = None
    eval_split: float = 0.0
    eval_every: int = 0
    epochs: int = 1
    steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    max_length: int = 128
    gradient_checkpointing: bool = False
    precision: str = "auto"
    fused_loss: bool = True
    threads: int = 0
    save_every: int = 0
    checkpoint_dir: str | None = None
    log: str | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    loss_on: str = "assistant"
    chat_template: str | None = None
    truncation: str = "right"
    skip_bad_records: bool = False
    packing: bool = False
    streaming: str = "auto"

    # options that change the trajectory: a resumed run must keep them
    TRAJECTORY = ("batch_size", "grad_accum", "lr", "warmup", "min_lr_ratio", "weight_decay",
                  "clip", "seed", "max_length", "precision", "eval_split",
                  "loraplus_lr_ratio", "loraplus_lr_embedding", "loss_on", "truncation",
                  "packing", "streaming")

    @classmethod
    def resolve(cls, spec_table: dict | None = None, spec_dir: Path | None = None,
                **cli: Any) -> "TrainConfig":
        """Merge the spec's table (paths made relative to ``spec_dir``) and the CLI's
        values (``None`` meaning "not given")."""
        values: dict[str, Any] = {}
        for key, value in (spec_table or {}).items():
            if key in PATH_KEYS and value is not None and spec_dir is not None:
                value = [str(spec_dir / v) for v in value] if isinstance(value, list) \
                    else str(spec_dir / value)
            values[key] = value
        values.update({k: v for k, v in cli.items() if v is not None and v != ()})
        unknown = set(values) - set(OPTIONS)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        for key, value in values.items():
            problem = check_value(key, value)
            if problem:
                raise ValueError(f"{key}: {problem}")
            if OPTIONS[key].type is float:
                values[key] = float(value)
            if OPTIONS[key].several and isinstance(value, (list, tuple)):
                values[key] = value[0] if len(value) == 1 else tuple(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


assert set(OPTIONS) == {f.name for f in fields(TrainConfig)}, "OPTIONS and TrainConfig differ"
