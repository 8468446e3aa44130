"""The ``peftspec`` command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 failure, 2 bad input (spec, model source, adapter file,
usage). Human output by default; ``--json`` where a machine reads it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import PeftspecError

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

MODEL_HELP = ("model to adapt: 'default' (built-in nanoGPT, the default; "
              "'default:num_labels=N' for its sequence classifier), "
              "'py:pkg.module:factory' (any nn.Module), or 'hf:PATH' (local transformers dir)")


class Group(click.Group):
    """Turns peftspec errors into a message and an exit code, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PeftspecError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected failure: exit 1, no traceback
            if os.environ.get("PEFTSPEC_DEBUG"):
                raise
            err.print(f"[bold red]error:[/] {escape(type(exc).__name__)}: {escape(str(exc))}"
                      "\n(set PEFTSPEC_DEBUG=1 for the traceback)", soft_wrap=True)
            ctx.exit(1)


def _registry():
    from .plugins import get_registry
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = get_registry()
    for failure in reg.failures:
        err.print(f"warning: {failure}", soft_wrap=True)
    return reg


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peftspec")
def cli():
    """Declarative parameter-efficient fine-tuning for PyTorch.

    Write a TOML spec that says what to train, reparameterize (LoRA), augment
    (adapters) or prefix (soft prompts); peftspec compiles it against a model
    through its method plugins.

    \b
    Typical flow:
      peftspec check specs/lora.toml                 # validate, no model
      peftspec plan specs/lora.toml                  # what it would do
      peftspec apply specs/lora.toml --out a.safetensors
      peftspec plugins                               # methods installed

    Exit codes: 0 ok, 1 failure, 2 bad input.
    """


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def check(spec: Path, as_json: bool):
    """Validate SPEC without a model: syntax, keys, types, methods, selectors.

    Reports every problem at once, each as FILE:LINE: KEY: MESSAGE.
    """
    from .spec import load_spec

    s = load_spec(spec, registry=_registry())
    if as_json:
        out.print_json(json.dumps({"ok": True, "spec": str(spec), "name": s.name,
                                   "rules": [{"rule": r.where, "method": r.method,
                                              "line": r.line} for r in s.rules]}))
    else:
        out.print(f"{spec}: ok, {len(s.rules)} rule(s): " +
                  ", ".join(f"{r.where} {r.method}" for r in s.rules))


def _load(spec: Path, model: str | None):
    from .plan import compile_plan
    from .spec import load_spec

    reg = _registry()
    s = load_spec(spec, registry=reg)
    with err.status(f"loading model {model or 'default'}..."):
        m = reg.load_model(model)
    return reg, s, m, compile_plan(s, m, registry=reg)


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
    if verbose:
        for r in plan.rules():
            out.print(f"[bold]{r.rule}[/] ({r.method}):")
            for target in r.targets:
                out.print(f"  {target}")
    pct = 100.0 * plan.trainable_params / max(plan.total_params, 1)
    out.print(f"trainable: {plan.trainable_params:,} of {plan.total_params:,} parameters "
              f"({pct:.4f}%); adapter size: {human_bytes(plan.adapter_bytes)} "
              f"({plan.adapter_bytes:,} bytes of tensors)")


def memory_options(fn):
    """The options ``peftspec memory`` and ``peftspec plan --memory`` share."""
    for opt in reversed([
        click.option("--batch-size", type=int, default=None,
                     help="examples per micro-batch [default: the spec's train_config, else 8]"),
        click.option("--seq-len", type=int, default=None,
                     help="tokens per example [default: the spec's max_length, else 128]"),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
                     help="activation precision [default: the spec's, else fp32]"),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     help="estimate activations with checkpointed blocks"),
    ]):
        fn = opt(fn)
    return fn


@cli.command()
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
    loaded = _load(spec, model)
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
    from .cli_train import memory_numbers, print_memory

    table = memory_numbers(spec, model, batch_size, seq_len, precision, gradient_checkpointing,
                           loaded=loaded)
    if as_json:
        out.print_json(json.dumps({"plan": p.to_dict(), "memory": table}))
        return
    _print_plan(p, verbose)
    print_memory(table)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", default=None, metavar="M", help=MODEL_HELP)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="adapter file to write (.safetensors)")
@click.option("--seed", default=0, show_default=True, help="seed for the adapter's init")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def apply(spec: Path, model: str | None, out_path: Path, seed: int, as_json: bool):
    """Apply SPEC to a model and write the freshly initialised adapter.

    The file is self-describing (spec, base fingerprint, version): load it
    with peftspec.load_adapter(model, path), train it with `peftspec train`.
    """
    import torch

    from .adapter_file import save_adapter
    from .patching import apply_plan

    reg, _, m, p = _load(spec, model)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    apply_plan(p, m, registry=reg)
    elapsed = time.perf_counter() - t0
    save_adapter(m, out_path)
    size = out_path.stat().st_size
    if as_json:
        out.print_json(json.dumps({**p.to_dict(), "out": str(out_path), "file_bytes": size,
                                   "apply_seconds": elapsed}))
    else:
        _print_plan(p, verbose=False)
        out.print(f"wrote {out_path} ({human_bytes(size)}) in {elapsed * 1000:.0f} ms")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(as_json: bool):
    """List every method and model source, with the distribution providing it.

    Set PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD=1 to load built-ins only.
    """
    reg = _registry()
    rows = [{**info.method.describe(), "distribution": info.dist}
            for _, info in sorted(reg.methods.items())]
    sources = [{"source": s.prefix, "help": s.help, "distribution": s.dist}
               for _, s in sorted(reg.sources.items())]
    failures = [{"distribution": f.dist, "entry_point": f.entry_point, "error": f.error}
                for f in reg.failures]
    if as_json:
        out.print_json(json.dumps({"methods": rows, "sources": sources, "failures": failures}))
        return
    t = Table(title="methods", title_justify="left")
    for col in ("method", "family", "mergeable", "distribution", "summary"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["family"], "yes" if r["mergeable"] else "no", r["distribution"],
                  r["summary"])
    out.print(t)
    t = Table(title="model sources", title_justify="left")
    for col in ("source", "distribution", "help"):
        t.add_column(col)
    for s in sources:
        t.add_row(s["source"], s["distribution"], s["help"])
    out.print(t)


@cli.command()
@click.option("--model", "-m", default=None, metavar="M", help=MODEL_HELP)
@click.option("--adapter", "-a", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the peftspec adapter file to fold in")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder to write the merged model to (replaced atomically)")
@click.option("--skip-unmergeable", is_flag=True,
              help="drop methods that cannot fold into weights (adapters, soft prompts)")
@click.option("--allow-nonfinite", is_flag=True, help="merge an adapter holding NaN/Inf")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def merge(model: str | None, adapter: Path, out_dir: Path, skip_unmergeable: bool,
          allow_nonfinite: bool, as_json: bool):
    """Fold an adapter into its base model's weights and write a plain model.

    \b
    For an hf: directory the base is streamed tensor by tensor: the output has
    the base's own keys, dtypes and sharding, with its config and tokenizer
    files copied; peak memory stays far below the model's size. Example:
      peftspec merge --model hf:./gpt2 --adapter lora.safetensors --out gpt2-merged
    """
    from rich.progress import Progress

    from .merge_stream import merge_to_dir

    reg = _registry()
    t0 = time.perf_counter()
    with Progress(console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task("merging", total=None)
        summary = merge_to_dir(model, adapter, out_dir, skip_unmergeable=skip_unmergeable,
                               allow_nonfinite=allow_nonfinite, registry=reg,
                               progress=lambda done, total: bar.update(task, completed=done,
                                                                       total=total))
    from .train.loop import peak_rss_mb

    peak_mb = peak_rss_mb()  # this process's own peak, not one inherited from a parent
    summary = {**summary, "out": str(out_dir), "seconds": time.perf_counter() - t0,
               "peak_rss_mb": peak_mb}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(f"wrote {out_dir}: {summary['tensors']} tensors in {summary['shards']} "
                  f"shard(s) in {summary['seconds']:.1f} s; peak memory {peak_mb:.0f} MB")


def main(argv=None):
    """Console-script entry point."""
    _add_plugin_commands()
    cli.main(args=argv, prog_name="peftspec")


def _add_plugin_commands() -> None:
    # Plugins may add subcommands; a broken one must not break the CLI.
    from .plugins import get_registry
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = get_registry()
    for impl in reg.pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=cli)
        except Exception as exc:  # noqa: BLE001
            err.print(f"warning: plugin {impl.plugin_name!r} failed to add commands: {exc!r}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
from . import cli_interop  # noqa: E402,F401 - registers export/import
from . import cli_train  # noqa: E402,F401 - registers train/report
