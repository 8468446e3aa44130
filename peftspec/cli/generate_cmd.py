"""``peftspec generate``: answers of the base model and of adapters, side by side.

A thin command over :mod:`peftspec.generate`: reads prompts, loads the model
and adapters, prints each prompt with one answer per model (streamed while a
terminal watches), or ``--json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from peftspec.cli.common import MODEL_HELP, err, out, registry
from peftspec.generate import (Prompt, generate as run, load, read_conversations,
                               read_prompts)


@click.command()
@click.option("--model", "-m", "model_source", default=None, metavar="M", help=MODEL_HELP)
@click.option("--adapter", "-a", "adapters", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="an adapter file (repeatable: each is shown beside the others)")
@click.option("--no-base", is_flag=True, help="leave out the base model's answers")
@click.option("--prompt", "-p", "prompts", multiple=True, metavar="TEXT",
              help="a prompt (repeatable)")
@click.option("--prompts", "prompt_files", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help='a file of prompts (repeatable): JSONL {"prompt": ...} records (a '
                   '"completion" is shown as the expected answer), or one prompt per line')
@click.option("--messages", "message_files", multiple=True, metavar="DATA",
              help='conversations to answer (repeatable; any format train reads): each '
                   '{"messages": [...]} record is answered at its last user turn, with '
                   'the history before it; an assistant turn after it is the expected answer')
@click.option("--raw", is_flag=True,
              help="feed the prompt as it is, without the tokenizer's chat template")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy; above 0: sample")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True, help="nucleus sampling (with --temperature)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for sampling")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="rows (prompt x model) per batch")
@click.option("--json", "as_json", is_flag=True, help="print the answers as JSON")
def generate(model_source: str | None, adapters: tuple[Path, ...], no_base: bool,
             prompts: tuple[str, ...], prompt_files: tuple[Path, ...],
             message_files: tuple[str, ...], raw: bool,
             max_new_tokens: int, temperature: float, top_p: float, seed: int,
             batch_size: int, as_json: bool):
    """Generate answers to prompts with the base model and each --adapter.

    \b
    Prompts go through the tokenizer's chat template (one user turn) when it
    has one, as `peftspec train` formats prompt/completion records; --raw
    skips it. Greedy unless --temperature > 0. The base and the adapters that
    allow it (LoRA family, bottleneck, IA3) run in one batch through per-row
    adapters; others (soft prompts, [[train]] picks) in a pass each. Works
    with merged output folders too (--model hf:DIR).
    \b
    Examples:
      peftspec generate --model smollm2 -p "What is the capital of France?"
      peftspec generate --model smollm2 --adapter town.safetensors \\
        --prompts data/brindlecombe-heldout.jsonl
      peftspec generate --model smollm2 --adapter chat.safetensors \\
        --messages data/brindlecombe-chat.jsonl
    """

    items = [Prompt(p) for p in prompts]
    for path in prompt_files:
        items += read_prompts(path)
    if message_files:
        items += read_conversations(list(message_files))
    if not items:
        raise click.UsageError("give --prompt TEXT (repeatable), --prompts FILE or "
                               "--messages FILE")
    if no_base and not adapters:
        raise click.UsageError("--no-base leaves nothing to run: give an --adapter too")
    reg = registry()
    with err.status(f"loading model {model_source or 'default'}..."):
        session = load(model_source, adapters, registry=reg)
    names = ([] if no_base else [None]) + session.names
    settings = {"chat": not raw, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "batch_size": batch_size}
    labels = {None: "base", **{n: n for n in session.names}}
    expected = {p.text: p.expected for p in items}
    stream = out.is_terminal and not as_json
    if stream:  # the table grows token by token
        with Live(_table([], labels, expected), console=out, auto_refresh=False) as live:
            answers = run(session.model, session.tokenizer, items, adapters=names,
                          on_update=lambda a: live.update(_table(a, labels, expected),
                                                          refresh=True), **settings)
            live.update(_table(answers, labels, expected), refresh=True)
    else:
        answers = run(session.model, session.tokenizer, items, adapters=names, **settings)
    if as_json:
        out.print_json(json.dumps({
            "model": model_source or "default",
            "adapters": {n: str(p) for n, p in zip(session.names, adapters)},
            "settings": settings,
            "answers": [{**a.to_dict(), "expected": expected.get(a.prompt)} for a in answers],
        }))
    elif not stream:
        out.print(_table(answers, labels, expected))


def _table(answers, labels: dict, expected: dict) -> Table:
    """One block per prompt: the prompt (and the expected answer), then each
    model's answer on its own row."""
    table = Table(show_header=False, box=None, pad_edge=False, padding=(0, 1))
    table.add_column("model", style="bold cyan", no_wrap=True)
    table.add_column("answer", overflow="fold")
    last = None
    for a in answers:
        if last is None or a.prompt != last:
            if last is not None:
                table.add_row("", "")
            table.add_row("[bold]prompt[/]", f"[bold]{escape(a.prompt)}[/]")
            if expected.get(a.prompt):
                table.add_row("[dim]expected[/]", f"[dim]{escape(expected[a.prompt])}[/]")
            last = a.prompt
        cut = "" if a.finished else " [dim]…[/]"
        table.add_row(escape(labels.get(a.adapter, str(a.adapter))), escape(a.text) + cut)
    return table
