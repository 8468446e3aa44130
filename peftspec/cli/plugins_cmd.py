"""``peftspec plugins [METHOD]``: what is installed, from where, and what each
method's options are (``explain`` is the same command under the name a spec
writer looks for).

The listing never truncates a method or distribution name (the columns a user
checks there): those columns do not wrap, the summary column folds, and when
the terminal leaves it too little room each entry becomes a paragraph with
its summary wrapped below it: the summary is never dropped.
"""

from __future__ import annotations

import json

import click
from rich.markup import escape
from rich.table import Table

from peftspec.core.errors import did_you_mean
from peftspec.core.explain import describe_method, toml_value
from peftspec.cli.common import err, out, registry

_NARROWEST_SUMMARY = 24  # columns; below that the summary goes


@click.command()
@click.argument("method", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(method: str | None, as_json: bool):
    """List every method and model source, with the distribution providing it.

    With METHOD: its options (type, default, bounds, doc) and an example rule.
    Set PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD=1 to load built-ins only.
    """
    reg = registry()
    for empty in reg.empty:
        err.print(f"[yellow]warning:[/] {escape(str(empty))}", soft_wrap=True)
    if method is not None:
        _explain(reg, method, as_json)
        return
    rows = [{**info.method.describe(), "distribution": info.dist}
            for _, info in sorted(reg.methods.items())]
    sources = [{"source": s.prefix, "help": s.help, "distribution": s.dist}
               for _, s in sorted(reg.sources.items())]
    failures = [{"distribution": f.dist, "entry_point": f.entry_point, "error": f.error}
                for f in reg.failures]
    empty = [{"distribution": e.dist, "entry_point": e.entry_point, "reason": e.reason}
             for e in reg.empty]
    if as_json:
        out.print_json(json.dumps({"methods": rows, "sources": sources, "failures": failures,
                                   "empty": empty}))
        return
    cols = ["method", "family", "mergeable", "distribution"]
    cells = [[r["name"], r["family"], "yes" if r["mergeable"] else "no", r["distribution"]]
             for r in rows]
    _show("methods", cols, cells, [r["summary"] for r in rows], "summary")
    _show("model sources", ["source", "distribution"],
          [[s["source"], s["distribution"]] for s in sources], [s["help"] for s in sources],
          "help")
    if reg.methods:
        out.print("details of one method: peftspec plugins METHOD", style="dim")


def _show(title: str, cols: list[str], cells: list[list[str]], notes: list[str],
          note_col: str) -> None:
    """A table whose named columns never wrap or truncate; the free-text column
    folds. Where the terminal leaves it too little room, or even the named
    columns do not fit, one entry per paragraph instead, its note wrapped below
    (a table would crop them or drop the note)."""
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    fixed = sum(widths) + 3 * len(cols) + 1  # cell padding and borders
    if fixed > out.width or (any(notes) and out.width - fixed - 3 < _NARROWEST_SUMMARY):
        out.print(title)
        for row, note in zip(cells, notes):
            out.print(escape(row[0]), style="bold", soft_wrap=True)
            out.print("  " + escape(", ".join(f"{c}: {v}" for c, v in zip(cols[1:], row[1:]))),
                      soft_wrap=True)
            if note:
                out.print("  " + escape(note), style="dim", soft_wrap=True)
        return
    out.print(_table(title, cols, widths, cells, notes, note_col, out.width - fixed - 3))


def _table(title, cols, widths, cells, notes, note_col, room) -> Table:
    t = Table(title=title, title_justify="left")
    for c, w in zip(cols, widths):
        t.add_column(c, no_wrap=True, min_width=w, overflow="fold")
    with_notes = room >= _NARROWEST_SUMMARY
    if with_notes:
        t.add_column(note_col, overflow="fold", ratio=1)
    for row, note in zip(cells, notes):
        t.add_row(*row, *([note] if with_notes else []))
    return t


def _explain(reg, name: str, as_json: bool) -> None:
    info = reg.methods.get(name)
    if info is None:
        hint = did_you_mean(name, reg.methods)
        raise click.BadParameter(f"no method named {name!r} is installed"
                                 + (f" ({hint})" if hint else "")
                                 + f"; installed: {', '.join(sorted(reg.methods))}",
                                 param_hint="METHOD")
    d = describe_method(info.method, info.dist)
    if as_json:
        out.print_json(json.dumps(d))
        return
    # A list, not a table: docs are sentences, and a table of five columns is
    # unreadable in a narrow terminal.
    say = lambda text="", **kw: out.print(escape(text), soft_wrap=True, **kw)  # noqa: E731
    say(f"{d['name']}  {d['section']}, from distribution {d['distribution']}; "
        f"{'mergeable' if d['mergeable'] else 'not mergeable'}"
        + ("; outputs unchanged at apply" if d["unchanged_at_apply"] else ""), style="bold")
    if d["summary"]:
        say(d["summary"])
    say()
    say("options:")
    for o in d["options"]:
        facts = [o["type"]]
        if o["min"] is not None:
            facts.append(f">= {o['min']:g}")
        if o["max"] is not None:
            facts.append(f"<= {o['max']:g}")
        facts.append("required" if o["required"] else (
            "no default" if o["default"] is None else f"default {toml_value(o['default'])}"))
        say(f"  {o['name']}: " + ", ".join(facts))
        if o["doc"]:
            say(f"      {o['doc']}", style="dim")
    if d["family"] != "prefix":
        say("  exclude: a list of selectors, default []")
        say(f"      {d['rule_keys']['exclude']}", style="dim")
        say("  optional: true or false, default false")
        say(f"      {d['rule_keys']['optional']}", style="dim")
    say()
    say("example:")
    for line in d["example"].splitlines():
        say(f"  {line}")
