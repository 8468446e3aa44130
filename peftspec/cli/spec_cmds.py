"""``peftspec check``, ``plan`` and ``apply``: a spec against a model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from peftspec.cli.common import MODEL_HELP, err, human_bytes, load, memory_options, out, registry
from peftspec.core.spec import load_spec
from peftspec.core.sizeguard import AdapterTooLarge, check_fits
from peftspec.cli.memory_view import memory_numbers, print_memory
from peftspec.formats.adapter_file import save_adapter
from peftspec.core.patching import apply_plan


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", default=None, metavar="M",
              help="also compile SPEC against this model, as plan and apply do: selectors, "
                   "each method's check on every module it targets, conflicts. " + MODEL_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def check(spec: Path, model: str | None, as_json: bool):
    """Validate SPEC: syntax, keys, types, methods, selector syntax, each option.

    Without --model no model is loaded, so what depends on one (does a
    selector match, can each module take its method) is left to plan. With
    --model M the spec is compiled against M, running each method's check on
    every module it targets: check --model M fails (exit 2, or 3 for a plugin
    that failed) exactly where plan and apply --model M fail. Reports every
    problem at once, each as FILE:LINE: KEY: MESSAGE.
    """

    if model is None:
        s = load_spec(spec, registry=registry())
    else:
        _, s, _, _ = load(spec, model)
    if as_json:
        out.print_json(json.dumps({"ok": True, "spec": str(spec), "name": s.name,
                                   "model": model,
                                   "rules": [{"rule": r.where, "method": r.method,
                                              "line": r.line} for r in s.rules]}))
    else:
        out.print(f"{spec}: ok, {len(s.rules)} rule(s): " +
                  ", ".join(f"{r.where} {r.method}" for r in s.rules) +
                  (f"; compiled against {model}" if model else ""))


def _print_plan(plan, verbose: bool) -> None:
    t = Table(title=f"plan for {plan.spec.file}", title_justify="left")
    for col, just in (("rule", "left"), ("method", "left"), ("line", "right"),
                      ("matched", "right"), ("added", "right"), ("trained", "right"),
                      ("bytes", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    t.caption = "added: new parameters; trained: existing parameters made trainable"
    for r in plan.rules():
        t.add_row(r.rule, r.method, str(r.line or ""), str(len(r.targets)),
                  f"{r.params_added:,}", f"{r.params_trained:,}", human_bytes(r.bytes))
    out.print(t)
    for rule in plan.spec.rules:  # show what a preset expanded to
        preset = getattr(rule.options, "preset", None)
        if preset:
            sels = "; ".join(f"{k} = {v}" for k, v in plan.selectors_of(rule.where).items() if v)
            out.print(f"{rule.where}: preset '{preset}' expands to {sels}")
    for where, note in plan.notes.items():  # the promise, for rules that change the base
        out.print(f"{where}: {escape(note)}")
    if verbose:
        for r in plan.rules():
            out.print(f"[bold]{r.rule}[/] ({r.method}):")
            for target in r.targets:
                out.print(f"  {target}")
    pct = 100.0 * plan.trainable_params / max(plan.total_params, 1)
    out.print(f"trainable: {plan.trainable_params:,} of {plan.total_params:,} parameters "
              f"({pct:.4f}%); adapter size: {human_bytes(plan.adapter_bytes)} "
              f"({plan.adapter_bytes:,} bytes of tensors)")
    if plan.frozen or plan.base_bytes_after != plan.base_bytes_before:
        ratio = plan.base_bytes_after / max(plan.base_bytes_before, 1)
        out.print(f"frozen base: {human_bytes(plan.base_bytes_before)} in float storage, "
                  f"{human_bytes(plan.base_bytes_after)} stored ({ratio:.3f}x; "
                  f"{len(plan.frozen)} module(s) frozen by {escape('[[freeze]]')})",
                  soft_wrap=True)

    try:
        check_fits(plan)
    except AdapterTooLarge as exc:  # plan changes nothing; apply and train will refuse
        err.print(f"[yellow]warning:[/] apply and train refuse this: {escape(str(exc))}",
                  soft_wrap=True)


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", default=None, metavar="M", help=MODEL_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--verbose", "-v", is_flag=True, help="list every matched module")
@click.option("--memory", "with_memory", is_flag=True,
              help="also the training memory of full fine-tuning against SPEC (weights, "
                   "gradients, AdamW states, activations); the options below shape it")
@memory_options
def plan(spec: Path, model: str | None, as_json: bool, verbose: bool, with_memory: bool,
         batch_size: int | None, seq_len: int | None, precision: str | None,
         gradient_checkpointing: bool | None):
    """Show what SPEC would do to a model, changing nothing.

    Per rule: modules matched, parameters added or made trainable, bytes; then
    the trainable total, its share of all parameters, and the adapter size.
    With --memory, the table of `peftspec memory` follows (with --json: one
    object with "plan" and "memory").
    """
    loaded = load(spec, model)
    p = loaded[3]
    shaping = [name for name, v in (("--batch-size", batch_size), ("--seq-len", seq_len),
                                    ("--precision", precision),
                                    ("--gradient-checkpointing", gradient_checkpointing))
               if v is not None]
    if shaping and not with_memory:
        raise click.UsageError(f"{shaping[0]} shapes the memory table: add --memory")
    if not with_memory:
        if as_json:
            out.print_json(p.to_json())
        else:
            _print_plan(p, verbose)
        return

    table = memory_numbers(spec, model, batch_size, seq_len, precision, gradient_checkpointing,
                           loaded=loaded)
    if as_json:
        out.print_json(json.dumps({"plan": p.to_dict(), "memory": table}))
        return
    _print_plan(p, verbose)
    print_memory(table)


@click.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", default=None, metavar="M", help=MODEL_HELP)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="adapter file to write (.safetensors)")
@click.option("--seed", default=0, show_default=True, help="seed for the adapter's init")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--force", is_flag=True,
              help="apply even an adapter larger than the base model or than the memory "
                   "available (refused otherwise, before anything is allocated)")
def apply(spec: Path, model: str | None, out_path: Path, seed: int, as_json: bool,
          force: bool):
    """Apply SPEC to a model and write the freshly initialised adapter.

    The file is self-describing (spec, base fingerprint, version): load it
    with peftspec.load_adapter(model, path), train it with `peftspec train`.
    """
    import torch


    reg, _, m, p = load(spec, model)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    apply_plan(p, m, registry=reg, force=force)
    elapsed = time.perf_counter() - t0
    save_adapter(m, out_path)
    size = out_path.stat().st_size
    if as_json:
        out.print_json(json.dumps({**p.to_dict(), "out": str(out_path), "file_bytes": size,
                                   "apply_seconds": elapsed}))
    else:
        _print_plan(p, verbose=False)
        out.print(f"wrote {out_path} ({human_bytes(size)}) in {elapsed * 1000:.0f} ms")
