"""``peftspec train``, ``peftspec memory`` and ``peftspec report``.

Thin commands over :mod:`peftspec.train`: option parsing, a progress bar on
stderr, Ctrl-C handling, printing. Options may also come from the spec's
``[train_config]`` table; the command line wins.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn)

from peftspec.core.train_config import OPTIONS, TrainConfig
from peftspec.cli.common import MODEL_HELP, err, memory_options, out, registry
from peftspec.cli.memory_view import memory_report
from peftspec.core.spec import load_spec
from peftspec.train.loop import train as run_train
from peftspec.train.report import render

CLI_TYPES = {int: int, float: float, str: str}


def _train_option(key: str):
    opt = OPTIONS[key]
    name = "--" + key.replace("_", "-")
    shown = "" if opt.default is None else f" [default: {opt.default}]"
    if opt.type is bool:
        return click.option(f"{name}/--no-{name[2:]}", key, default=None,
                            help=opt.help + (" [default: off]" if not opt.default else ""))
    ptype = click.Choice(opt.choices) if opt.choices else CLI_TYPES[opt.type]
    metavar = key.upper() if opt.type is str and not opt.choices else None
    return click.option(name, key, type=ptype, default=None, metavar=metavar,
                        multiple=opt.several, help=opt.help + shown)


def _skipped(e: dict) -> str:
    return f", {e['skipped_bad']} bad records skipped" if e.get("skipped_bad") else ""


def _print_streamed(e: dict, resumed: str) -> None:
    st = e["streamed"]
    files = f"{st['files']} files" if st["files"] > 1 else "1 file"
    err.print(f"training {e['trainable']:,} parameters on {e['examples']:,} of "
              f"{st['records']:,} records streamed from {files} ({st['bytes'] / 2**20:,.1f} MiB; "
              f"indexed in {st['index_seconds']:.1f} s, {st['index_bytes'] / 2**20:.1f} MiB, "
              f"every record checked in {st['check_seconds']:.1f} s{_skipped(e)}) "
              f"for {e['total_steps']} steps ({e['eval_examples']} for eval, max "
              f"{e['max_length']} tokens{', packed' if e.get('packing') else ''}"
              f"{escape(resumed)}); records are tokenized as training reads them, and "
              "what truncation costs is counted at the end")


def _options(f):
    """Every training option (peftspec.core.train_config.OPTIONS), defaulting to None:
    a value not given comes from the spec's [train_config], else the default."""
    for key in reversed(list(OPTIONS)):
        f = _train_option(key)(f)
    return f


class _Stopper:
    """First Ctrl-C (or SIGTERM): finish the step, checkpoint, exit. Second: abort."""

    def __init__(self, quiet: bool = False):
        self.flag, self.quiet = False, quiet
        self.old = {}

    def __call__(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        if not self.quiet:
            err.print("[yellow]interrupted:[/] finishing this step and saving a checkpoint "
                  "(Ctrl-C again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", "model_source", default=None, metavar="M", help=MODEL_HELP)
@click.option("--out", "out_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="adapter file to write when training ends (.safetensors)")
@click.option("--resume", default=None, type=click.Path(exists=True, path_type=Path),
              help="continue from a checkpoint folder, or the latest one in a checkpoint dir")
@_options
@click.option("--fsdp", is_flag=True,
              help="under torchrun: shard the model over the processes with FSDP2 "
                   "(for bases too large for one device) instead of a copy per process (DDP)")
@click.option("--json", "as_json", is_flag=True, help="print a machine-readable summary")
@click.option("--force", is_flag=True,
              help="train even an adapter larger than the base model or than the memory "
                   "available (refused otherwise, before anything is allocated)")
def train(spec: Path, model_source: str | None, out_path: Path, resume: Path | None,
          fsdp: bool, as_json: bool, force: bool, **options):
    """Train SPEC's adapter on a data file and write it to --out.

    \b
    Data (--data, repeatable, globs too): JSONL, JSON, CSV/TSV, Parquet, a
    datasets folder, .txt. Conversations {"messages": [{"role", "content"},
    ...]} are rendered with the model's chat template and only the assistant
    turns scored (--loss-on); {"prompt", "completion"} scores the completion;
    {"text"} every token. A bad record stops the run before training, named
    FILE:LINE (--skip-bad-records to leave such records out). See what a run
    would train on first: peftspec data inspect DATA --model M --show 2.
    The default model trains on bytes, with no download; hf: models use
    their directory's tokenizer.
    \b
    {"text": ..., "label": ...} records (label: a class id, or a string)
    train a sequence classifier: the model's classification variant with a
    new head, which the spec must train ([[train]] params = ["score.**"];
    "classifier.**" for BERT); eval reports accuracy, and the adapter file
    records the labels.
    \b
    Only the trainable parameters reach AdamW; frozen weights stay
    bit-identical. Learning rate: linear --warmup, then cosine decay.
    Checkpoints (--save-every N, and on Ctrl-C) go to --checkpoint-dir
    (default: OUT with the suffix '.checkpoints'); --resume DIR continues
    exactly where one left off. Ctrl-C exits with code 130 after saving.
    \b
    Several processes: launch with torchrun (DDP; gloo on CPU, NCCL with one
    GPU per process); --batch-size is then the global batch, split evenly
    over the processes, and the adapter is the one a single process trains.
    Only rank 0 writes files and prints.
    \b
    Example:
      peftspec train specs/train-lora.toml --out lora.safetensors --log metrics.jsonl
      torchrun --nproc_per_node=2 --no-python -- peftspec train specs/train-lora.toml \\
        --out lora.safetensors [--fsdp]
    """

    reg = registry()
    s = load_spec(spec, registry=reg)
    try:
        cfg = TrainConfig.resolve(s.train_config, spec.parent, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if cfg.checkpoint_dir is None:
        cfg = cfg.with_(checkpoint_dir=str(out_path.with_suffix(".checkpoints")))
    rank0 = os.environ.get("RANK", "0").strip() in ("", "0")  # torchrun sets RANK
    if not rank0:  # rank 0 prints for all, its warnings included
        warnings.simplefilter("ignore")

    progress = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  "
                                   "{task.fields[tps]} tok/s"),
                        TimeRemainingColumn(), transient=True, disable=not rank0,
                        # a quiet console too: rich 13.7 prints a newline on stop
                        # even when disabled, and other ranks must print nothing
                        console=err if rank0 else Console(stderr=True, quiet=True))
    task = progress.add_task("train", total=None, loss="-", lr="-", tps="-")
    last_eval = {}

    def on_event(e: dict) -> None:
        if e["type"] == "start":
            progress.update(task, total=e["total_steps"], completed=e["step"])
            if not as_json:
                resumed = f", resumed from {e['resumed_from']}" if e["resumed_from"] else ""
                if e.get("streamed"):
                    _print_streamed(e, resumed)
                    return
                err.print(f"training {e['trainable']:,} parameters on {e['examples']} examples "
                          f"({e['eval_examples']} for eval, max {e['max_length']} tokens, "
                          f"{e['dropped']} dropped, {e['truncated']} truncated"
                          f"{_skipped(e)}) for {e['total_steps']} steps{escape(resumed)}")
                err.print(f"precision {e['precision']} ({escape(e['precision_why'])}), "
                          f"{e['threads']} CPU threads")
                if e.get("packed_rows"):
                    err.print(f"packed {e['examples']} examples into {e['packed_rows']} rows of "
                              f"at most {e['max_length']} tokens")
                if e.get("labels"):
                    names = ", ".join(map(str, e["labels"][:10])) + \
                        (", ..." if len(e["labels"]) > 10 else "")
                    err.print(f"sequence classification, {len(e['labels'])} labels: "
                              f"{escape(names)}")
        elif e["type"] == "train":
            progress.update(task, completed=e["step"], loss=f"{e['loss']:.4f}",
                            lr=f"{e['lr']:.2e}", tps=f"{e['tokens_per_s']:,.0f}")
        elif e["type"] == "eval":
            last_eval.update(e)
            acc = f", accuracy {e['accuracy']:.1%}" if "accuracy" in e else ""
            progress.console.print(f"step {e['step']}: eval loss {e['loss']:.4f}{acc}")
        elif e["type"] == "data" and not as_json:
            progress.console.print(
                f"read {e['records']:,} records as training went: {e['truncated']:,} "
                f"truncated, {e['dropped']:,} dropped, {e['skipped_bad']:,} bad records "
                f"skipped; {e['scored_tokens']:,} scored tokens")
        elif e["type"] == "checkpoint" and not as_json:
            progress.console.print(f"step {e['step']}: checkpoint {escape(str(e['path']))}")

    with _Stopper(quiet=not rank0) as stopper, progress:
        result = run_train(s, cfg, model_source=model_source, out=out_path, resume=resume,
                           registry=reg, on_event=on_event, should_stop=lambda: stopper.flag,
                           fsdp=fsdp, force=force)
    if not rank0:  # under torchrun, rank 0 reports for all
        if result.interrupted:
            raise click.exceptions.Exit(130)
        return
    summary = {"step": result.step, "total_steps": result.total_steps,
               "train_loss": result.train_loss, "eval_loss": result.eval_loss,
               "tokens": result.tokens, "seconds": result.seconds,
               "tokens_per_s": result.tokens_per_s, "peak_rss_mb": result.peak_rss_mb,
               "interrupted": result.interrupted,
               "checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "out": str(result.out) if result.out else None,
               "eval_accuracy": last_eval.get("accuracy")}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "-"
        ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        if last_eval.get("accuracy") is not None:
            ev += f", eval accuracy {last_eval['accuracy']:.1%}"
        out.print(f"{result.step}/{result.total_steps} steps, final train loss {loss}{ev}; "
                  f"{result.tokens_per_s:,.0f} tokens/s; peak memory "
                  f"{result.peak_rss_mb:.0f} MiB (peak resident set)", soft_wrap=True)
        if result.interrupted:
            out.print(f"interrupted; checkpoint {escape(str(result.checkpoint))}; continue "
                      f"with --resume {escape(str(cfg.checkpoint_dir))}", soft_wrap=True)
        else:
            out.print(f"wrote {escape(str(out_path))}", soft_wrap=True)
    if result.interrupted:
        raise click.exceptions.Exit(130)


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", "model_source", default=None, metavar="M", help=MODEL_HELP)
@memory_options
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def memory(spec: Path, model_source: str | None, batch_size: int | None, seq_len: int | None,
           precision: str | None, gradient_checkpointing: bool | None, as_json: bool):
    """Training memory of full fine-tuning against SPEC's adapter.

    \b
    The same table as `peftspec plan SPEC --memory`. Weights, gradients and
    AdamW states are exact (each parameter's numel times its dtype's size;
    AdamW: exp_avg + exp_avg_sq + a float32 step per trainable parameter).
    Activations are an estimate for a decoder of L layers, width h, a heads,
    vocabulary V at batch b, length s, p bytes per element:
    L * p/2 * s*b*h*(34 + 5*a*s/h) + s*b*h*p + s*b*V*(p + 8)
    (Korthikanti et al. 2022); with checkpointing L*s*b*h*p plus one layer.
    Soft prompts' virtual tokens count in s. `peftspec train` prints the
    measured peak at the end.
    """
    memory_report(spec, model_source, batch_size, seq_len, precision, gradient_checkpointing,
                  as_json)


@click.command()
@click.argument("metrics", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="image to write (.png, .svg, .pdf)")
@click.option("--title", default=None, help="plot title [default: the metrics file name]")
def report(metrics: Path, out_path: Path, title: str | None):
    """Draw train/eval loss and the learning rate against steps from METRICS.

    METRICS is the JSONL log `peftspec train --log` writes. Needs matplotlib:
    pip install 'peftspec[plot]'.
    """

    info = render(metrics, out_path, title=title)
    out.print(f"wrote {escape(str(out_path))} ({info['train_points']} train and "
              f"{info['eval_points']} eval points)", soft_wrap=True)
