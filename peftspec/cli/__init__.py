"""The ``peftspec`` command line: a thin layer over the Python API.

One module per command group (``spec_cmds``: check/plan/apply; ``train_cmds``:
train/memory/report; ``interop``: export/import; ``merge_cmd``; ``plugins_cmd``:
plugins/explain; ``schema_cmd``; ``generate_cmd``; ``combine_cmd``; ``compare_cmd``;
``data_cmd``: data inspect; ``chat_cmd``; ``serve_cmd``),
the helpers they share in :mod:`peftspec.cli.common`. This module builds the
group and imports the commands; commands never import it.

Exit codes: 0 ok, 1 failure, 2 bad input (spec, model source, adapter file,
usage, a plugin refusing the options), 3 a plugin failed (an exception from its
code, a broken frozen-base promise: :class:`peftspec.core.errors.PluginError`).
Human output by default; ``--json`` where a machine reads it.
"""

from __future__ import annotations

import sys

import click

from peftspec.core.version import __version__
from peftspec.cli import (chat_cmd, combine_cmd, compare_cmd, data_cmd, generate_cmd, interop,
                          merge_cmd, plugins_cmd, schema_cmd, serve_cmd, spec_cmds, train_cmds)
from peftspec.cli.common import Group, err, show_notes
from peftspec.core.registry import get_registry

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

    Exit codes: 0 ok, 1 failure, 2 bad input (a spec, a model source, an
    adapter file, a plugin refusing the options), 3 a plugin failed (a bug in
    its code, or a broken frozen-base promise; the message names it).
    """


for _command in (spec_cmds.check, spec_cmds.plan, spec_cmds.apply, train_cmds.train,
                 train_cmds.memory, train_cmds.report, merge_cmd.merge, plugins_cmd.plugins,
                 interop.export_cmd, interop.import_cmd, schema_cmd.schema,
                 generate_cmd.generate, compare_cmd.compare):
    cli.add_command(_command)
cli.add_command(plugins_cmd.plugins, name="explain")  # `peftspec explain lora`
cli.add_command(combine_cmd.combine)
cli.add_command(data_cmd.data)
cli.add_command(chat_cmd.chat)
cli.add_command(serve_cmd.serve)


def main(argv=None):
    """Console-script entry point."""
    show_notes()
    _add_plugin_commands()
    cli.main(args=argv, prog_name="peftspec")


def _add_plugin_commands() -> None:
    # Plugins may add subcommands; a broken one must not break the CLI.
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
