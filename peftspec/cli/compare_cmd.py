"""``peftspec compare``: train several specs alike and measure the trade-offs.

A thin command over :mod:`peftspec.compare`: options, the progress bars
(one for the run in progress, one over all runs) and a line per finished run
on stderr, the table on stdout, the figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn)

from peftspec.cli.common import MODEL_HELP, err, out
from peftspec.compare import figures
from peftspec.compare.runner import read_results
from peftspec.compare.table import markdown, tables
from peftspec.compare.runner import compare as run_compare
from peftspec.compare.settings import DEFAULT_REFERENCE, Settings, entries


def _finished_line(record: dict, cached: bool) -> str:
    q, sp = record["quality"], record["speed"]
    loss = "-" if q["eval_loss"] is None else f"{q['eval_loss']:.4f}"
    tps = "-" if sp["tokens_per_s"] is None else f"{sp['tokens_per_s']:,.0f}"
    how = "read back" if cached else f"{record['wall_seconds']:.0f} s"
    return (f"[green]done[/] {escape(record['name'])}: eval loss {loss}, {tps} tok/s, peak "
            f"{record['memory']['peak_rss_mb']:,.0f} MiB ({how})")


def _command_line(ctx: click.Context) -> list[str]:
    """The command as given: the specs and every option set on the command line."""
    from click.core import ParameterSource

    line = ["peftspec", "compare", *map(str, ctx.params["specs"])]
    for param in ctx.command.params:
        if param.name == "specs" or \
                ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        flag = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            line.append(flag)
        else:
            line += [flag, str(value)]
    return line


def _report(folder: Path, as_json: bool, as_markdown: bool) -> None:

    results = read_results(folder)
    written = figures.draw(results, folder)
    if as_json:
        out.print_json(json.dumps(results, default=str))
        return
    if as_markdown:
        click.echo(markdown(results))
        return
    for t in tables(results):
        out.print(t)
    out.print("figures: " + ", ".join(escape(str(p)) for p in written), soft_wrap=True)


@click.command()
@click.argument("specs", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", "model_source", default=None, metavar="M", help=MODEL_HELP)
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="training data (the formats of peftspec train)")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="evaluation data")
@click.option("--eval-split", type=click.FloatRange(0.0, 0.9, max_open=False), default=0.0,
              help="hold out this fraction of --data for evaluation instead of --eval")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="general text, not in the training data, whose loss before and after "
                   "training measures forgetting [default: data/reference.txt]")
@click.option("--no-reference", is_flag=True, help="skip the forgetting measurement")
@click.option("--steps", type=click.IntRange(1), default=40, show_default=True,
              help="optimizer steps per run")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lr", type=click.FloatRange(0.0, min_open=True), default=1e-3,
              show_default=True, help="peak learning rate (a spec's [train_config] lr wins)")
@click.option("--full-lr", type=click.FloatRange(0.0, min_open=True), default=None,
              help="full fine-tuning's peak learning rate [default: --lr]")
@click.option("--warmup", type=click.IntRange(0), default=0, show_default=True)
@click.option("--max-length", type=click.IntRange(2), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=click.IntRange(0), default=0,
              help="steps between eval points [default: steps/10]")
@click.option("--gen-tokens", type=click.IntRange(2), default=16, show_default=True,
              help="new tokens per latency measurement")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              show_default=True)
@click.option("--probe", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="prompts (a prompts file of peftspec generate) that the base and each "
                   "adapter answer greedily; the answers go into results.json")
@click.option("--probe-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--full", is_flag=True, help="add full fine-tuning (every parameter) as a row")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="folder for runs, results.json and figures")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="redraw the table and figures of DIR's results.json; "
                                 "trains nothing")
@click.option("--json", "as_json", is_flag=True, help="print results.json's content")
@click.option("--markdown", "as_markdown", is_flag=True,
              help="with --report: print the tables as markdown (for a README)")
def compare(specs: tuple[Path, ...], model_source, data, eval_path, eval_split, reference,
            no_reference, steps, batch_size, lr, full_lr, warmup, max_length, seed,
            eval_every, gen_tokens, precision, probe, probe_tokens, full, out_dir, report_dir,
            as_json, as_markdown):
    """Train every SPEC alike and measure the trade-offs side by side.

    \b
    Each spec (and with --full, full fine-tuning) is trained with the same
    data, steps, batch, seed and warmup-cosine schedule, each in a process of
    its own, and measured: trainable parameters; adapter file size against a
    full copy; peak resident memory beside the estimate of `peftspec
    memory`; training tokens/s; eval loss (and accuracy) with its curve;
    forgetting, the loss on --reference before and after; and the latency of
    one more generated token for the base, the adapter, and the adapter
    merged. A finished run is read back, not repeated, when the command is
    run again with the same settings; an interrupted one is run again.
    \b
    Writes OUT/results.json (a record per run, with the command and the
    environment), OUT/runs/NAME/ (adapter, metrics, log) and four PNG
    figures; --report OUT redraws them from results.json.
    \b
    Example:
      peftspec compare specs/lora.toml specs/prompt-tuning.toml --full \\
        --data data/brindlecombe-train.jsonl --eval data/brindlecombe-heldout.jsonl \\
        --steps 40 --out compare-out
    """
    if report_dir is not None:
        if specs or out_dir is not None:
            raise click.UsageError("--report DIR redraws an earlier comparison; give no SPEC "
                                   "and no --out with it")
        _report(report_dir, as_json, as_markdown)
        return

    if as_markdown:
        raise click.UsageError("--markdown goes with --report DIR")
    if out_dir is None:
        raise click.UsageError("give --out DIR (or --report DIR to redraw one)")
    if data is None:
        raise click.UsageError("give --data FILE: the training data every spec trains on")
    if no_reference:
        reference = None
    elif reference is None:
        if not DEFAULT_REFERENCE.is_file():
            raise click.UsageError(f"the default reference text {DEFAULT_REFERENCE} is not "
                                   "installed; give --reference FILE or --no-reference")
        reference = DEFAULT_REFERENCE
    settings = Settings(model=model_source, data=str(data),
                        eval=str(eval_path) if eval_path else None, eval_split=eval_split,
                        reference=str(reference) if reference else None, steps=steps,
                        batch_size=batch_size, lr=lr, full_lr=full_lr, warmup=warmup,
                        max_length=max_length, seed=seed, eval_every=eval_every,
                        gen_tokens=gen_tokens, precision=precision,
                        probe=str(probe) if probe else None, probe_tokens=probe_tokens)
    rows = entries(list(specs), full)

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                        console=err, transient=True)
    overall = progress.add_task("[bold]compare[/]", total=len(rows), info="")
    current = progress.add_task("", total=steps, info="", visible=False)

    def on_event(entry, e: dict) -> None:
        kind, name = e["type"], escape(entry.name)
        if kind in ("cached", "finished"):
            progress.console.print(_finished_line(e["record"], kind == "cached"))
            progress.update(current, visible=False)
            progress.advance(overall)
        elif kind == "failed":
            progress.console.print(f"[red]failed[/] {name}: {escape(e['message'])}",
                                   soft_wrap=True)
            progress.update(current, visible=False)
            progress.advance(overall)
        elif kind == "phase":
            progress.update(current, description=name, completed=0, total=steps,
                            info=e["phase"], visible=True)
        elif kind == "train":
            progress.update(current, completed=e["step"],
                            info=f"loss {e['loss']:.4f}  {e['tokens_per_s']:,.0f} tok/s")

    with progress:
        results = run_compare(rows, settings, out_dir, command=_command_line(click.get_current_context()),
                              on_event=on_event)
    written = figures.draw(results, out_dir) if results["runs"] else []
    if as_json:
        out.print_json(json.dumps(results, default=str))
    else:
        for t in tables(results):
            out.print(t)
        out.print(f"wrote {escape(str(out_dir / 'results.json'))}" +
                  (", " + ", ".join(escape(p.name) for p in written) if written else ""),
                  soft_wrap=True)
    if results["failed"]:
        raise click.exceptions.Exit(1)
