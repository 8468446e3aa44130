"""The terminal table of a comparison, drawn from its records alone."""

from __future__ import annotations

from rich.table import Table

from peftspec.core.atomicio import human_bytes


def _f(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _params(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def cost_cells(r: dict) -> list[str]:
    """What a run costs: parameters, storage, memory, speed (:data:`COST` order)."""
    p, st, m = r["params"], r["storage"], r["memory"]
    est = m["estimate"]["columns"]["full" if r["full"] else "spec"]
    tps = r["speed"]["tokens_per_s"]
    return [r["name"], _params(p["trainable"]), f"{p['trainable_pct']:.3g}%",
            f"{human_bytes(st['adapter_bytes'])} / {human_bytes(st['full_copy_bytes'])}",
            f"{m['peak_rss_mb']:,.0f} MiB", human_bytes(est["total"]),
            _f(tps, ",.0f"), f"{r['lr']:g}"]


def quality_cells(r: dict) -> list[str]:
    """What a run gives: eval loss, forgetting, inference cost (:data:`QUALITY` order)."""
    q, fg, lat = r["quality"], r["forgetting"], r["latency"]
    ev = _f(q["eval_loss"], ".4f")
    if q.get("eval_accuracy") is not None:
        ev += f" ({q['eval_accuracy']:.0%})"
    forgot = "-" if fg["before"] is None else f"{fg['before']:.3f} → {fg['after']:.3f}"
    delta = "-" if fg["increase"] is None else f"{fg['increase']:+.3f}"
    merged = _f(lat["merged_ms"], ".2f", "n/a" if lat["not_mergeable"] else "-")
    return [r["name"], ev, forgot, delta, _f(lat["base_ms"], ".2f"),
            _f(lat["unmerged_ms"], ".2f"), merged]


COST = ["run", "trainable", "% of base", "adapter / full copy", "peak RSS",
        "estimate", "train tok/s", "lr"]
QUALITY = ["run", "eval loss", "reference loss", "forgetting", "ms/token base",
           "adapter", "merged"]


def tables(results: dict) -> list[Table]:
    """The two rich tables of ``results`` (what ``results.json`` holds): cost, then quality."""
    s = results["settings"]
    title = (f"peftspec compare: {s['model'] or 'default'}, {s['steps']} steps, "
             f"batch {s['batch_size']} x {s['max_length']} tokens, seed {s['seed']}")
    made = []
    for cols, cells, caption in (
            (COST, cost_cells, "estimate: weights + gradients + AdamW states + activations "
                               "(peftspec memory); peak RSS: measured, the whole process"),
            (QUALITY, quality_cells, "reference loss: before → after training (forgetting: "
                                     "the increase); ms/token: one more generated token, "
                                     "batch 1")):
        t = Table(title=title if not made else None, title_justify="left", caption=caption,
                  caption_justify="left")
        for i, col in enumerate(cols):
            t.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for r in results["runs"]:
            t.add_row(*cells(r))
        made.append(t)
    if results.get("failed"):
        made[-1].caption += "; failed: " + ", ".join(f["name"] for f in results["failed"])
    return made


def markdown(results: dict) -> str:
    """Both tables as GitHub markdown (for a README), the cost columns then the
    quality ones, with the held-out loss before training beside the final one."""
    lines = []
    for cols, cells in ((COST, cost_cells), (QUALITY, quality_cells)):
        if cells is quality_cells:
            cols = [cols[0], "eval loss before → after", *cols[2:]]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in results["runs"]:
            row = cells(r)
            if cells is quality_cells:
                before = r["quality"].get("eval_loss_before")
                row[1] = f"{_f(before, '.3f')} → {row[1]}"
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        lines.append("")
    cols = ["run", "weights", "gradients", "AdamW states", "activations (est.)",
            "estimate", "RSS, model loaded", "peak RSS"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results["runs"]:
        m = r["memory"]
        est = m["estimate"]["columns"]["full" if r["full"] else "spec"]
        parts = [human_bytes(est[k]) if est[k] is not None else "-"
                 for k in ("weights", "gradients", "optimizer", "activations", "total")]
        lines.append("| " + " | ".join([r["name"], *parts,
                                         f"{_f(m.get('loaded_rss_mb'), ',.0f')} MiB",
                                         f"{m['peak_rss_mb']:,.0f} MiB"]) + " |")
    return "\n".join(lines) + "\n"
