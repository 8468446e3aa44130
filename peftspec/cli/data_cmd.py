"""``peftspec data inspect``: what a run would train on, before it runs.

A thin command over :mod:`peftspec.data.inspect`: the counts as a table (or
``--json``), and ``--show N`` examples with the scored tokens highlighted.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from peftspec.cli.common import MODEL_HELP, err, out, registry
from peftspec.core.spec import load_spec
from peftspec.core.train_config import OPTIONS, TrainConfig
from peftspec.data.examples import read_text
from peftspec.data.inspect import inspect as run_inspect
from peftspec.models.tokenizer import tokenizer_of_source


@click.group()
def data():
    """Look at training data as peftspec reads it."""


@data.command("inspect")
@click.argument("paths", nargs=-1, required=True, metavar="DATA...")
@click.option("--model", "-m", "model_source", default=None, metavar="M", help=MODEL_HELP)
@click.option("--spec", "spec_path", default=None,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="take max_length, loss_on, truncation, chat_template and "
                   "skip_bad_records from this spec's [train_config]")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help=f"tokens an example may have [default: the spec's, else "
                   f"{OPTIONS['max_length'].default}]")
@click.option("--loss-on", type=click.Choice(OPTIONS["loss_on"].choices), default=None,
              help=OPTIONS["loss_on"].help + " [default: assistant]")
@click.option("--truncation", type=click.Choice(OPTIONS["truncation"].choices), default=None,
              help=OPTIONS["truncation"].help + " [default: right]")
@click.option("--chat-template", type=click.Path(dir_okay=False, exists=True), default=None,
              help=OPTIONS["chat_template"].help)
@click.option("--skip-bad-records/--no-skip-bad-records", default=None,
              help=OPTIONS["skip_bad_records"].help)
@click.option("--show", type=click.IntRange(min=0), default=0, show_default=True,
              help="render this many examples, the scored tokens highlighted")
@click.option("--json", "as_json", is_flag=True,
              help="print the counts as JSON: format, records, tokens, scored_tokens, "
                   "dropped, truncated, lengths, ...")
def inspect(paths: tuple[str, ...], model_source: str | None, spec_path: Path | None,
            max_length: int | None, loss_on: str | None, truncation: str | None,
            chat_template: str | None, skip_bad_records: bool | None, show: int,
            as_json: bool):
    """Read DATA as `peftspec train` would and count what it trains on.

    \b
    DATA: files or globs: JSONL, JSON, CSV/TSV, Parquet, Arrow, a datasets
    save_to_disk folder, .txt. Conversations ({"messages": [...]}) are
    rendered with the model's chat template and, by default, only the
    assistant turns are scored (their end-of-turn token included); see
    --loss-on. Reports records, tokens, scored tokens, the dropped and the
    truncated, the formats and the length distribution; --show N prints N
    examples with the scored text highlighted.
    \b
    Examples:
      peftspec data inspect chats.jsonl --model smollm2 --show 2
      peftspec data inspect "data/*.parquet" --model hf:./my-model --json
    """
    table = {}
    spec_dir = None
    if spec_path is not None:
        table = load_spec(spec_path, registry=registry()).train_config
        spec_dir = spec_path.parent
    try:
        cfg = TrainConfig.resolve(table, spec_dir, max_length=max_length, loss_on=loss_on,
                                  truncation=truncation, chat_template=chat_template,
                                  skip_bad_records=skip_bad_records)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    tok = tokenizer_of_source(model_source)
    if cfg.chat_template:
        tok.use_chat_template(read_text(Path(cfg.chat_template), "chat template"))
    result = run_inspect(list(paths), tok, max_length=cfg.max_length, loss_on=cfg.loss_on,
                         truncation=cfg.truncation, skip_bad=cfg.skip_bad_records, show=show)
    if as_json:
        out.print_json(json.dumps(result, ensure_ascii=False))
        return
    _print(result)


def _print(r: dict) -> None:
    t = Table(title="what training sees", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    shapes = ", ".join(f"{n} {k}" for k, n in r["shapes"].items())
    rows = [("format", r["format"]), ("records", f"{r['records']:,} ({shapes})"),
            ("tokens", f"{r['tokens']:,}"),
            ("scored tokens", f"{r['scored_tokens']:,}" + (
                f" ({r['scored_tokens'] / r['tokens']:.0%})" if r["tokens"] else "")),
            ("truncated", f"{r['truncated']:,} (to {r['max_length']} tokens, "
                          f"truncation = {r['truncation']})"),
            ("dropped", f"{r['dropped']:,}" + (
                f" ({r['dropped_unscored']} with nothing to score)"
                if r.get("dropped_unscored") else "")),
            ("loss on", r["loss_on"])]
    if r["skipped_bad"]:
        rows.append(("bad records skipped", f"{r['skipped_bad']:,}"))
    lengths = r["lengths"]
    if lengths:
        rows.append(("length", f"min {lengths['min']}, median {lengths['median']}, "
                               f"p90 {lengths['p90']}, p99 {lengths['p99']}, "
                               f"max {lengths['max']}"))
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    out.print(t)
    colour = out.is_terminal and not out.no_color
    for ex in r["examples"]:
        out.rule(escape(ex["where"]))
        text = Text()
        for piece, scored in ex["segments"]:
            if colour:
                text.append(piece, style="bold green on grey15" if scored else "dim")
            else:  # no colours through a pipe: brackets mark the scored text
                text.append(f"\u27e6{piece}\u27e7" if scored else piece)
        out.print(text, soft_wrap=True)
    if r["examples"]:
        err.print("highlighted: scored (the loss covers it); dim: context only" if colour else
                  "\u27e6...\u27e7: scored (the loss covers it); the rest: context only")
