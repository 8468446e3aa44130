"""``peftspec schema``: the spec format as JSON Schema, for TOML editors.

Built from the methods installed here (third-party ones included); see
:mod:`peftspec.core.schema` and ``docs/plugins.md`` for the editor set-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from peftspec.formats.adapter_file import atomic_write_bytes
from peftspec.core.schema import spec_schema
from peftspec.cli.common import err, out, registry


@click.command()
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="write the schema here (atomically) instead of to stdout")
def schema(out_path: Path | None):
    """Write a JSON Schema of the spec format, for editors (Taplo / Even Better TOML).

    \b
    peftspec schema --out peftspec.schema.json
    then start a spec with the line:  #:schema ./peftspec.schema.json
    """
    text = json.dumps(spec_schema(registry()), indent=2) + "\n"
    if out_path is None:
        out.file.write(text)
        return
    atomic_write_bytes(out_path, text.encode())
    err.print(f"wrote {out_path} (JSON Schema draft 4)")
