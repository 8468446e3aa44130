"""``peftspec plugins``: what methods and model sources are installed, and from where.
"""

from __future__ import annotations

import json

import click
from rich.table import Table

from .common import out, registry


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(as_json: bool):
    """List every method and model source, with the distribution providing it.

    Set PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD=1 to load built-ins only.
    """
    reg = registry()
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
