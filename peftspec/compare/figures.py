"""The figures of a comparison, drawn from ``results.json`` alone (so
``peftspec compare --report DIR`` redraws them without training):

* ``loss_curves.png``: train loss per step and eval loss (the base's at step 0),
  every run overlaid;
* ``quality_vs_params.png``: final eval loss against trainable parameters (log x);
* ``memory.png``: per run, the measured peak resident set (split at the
  resident set once the model is loaded: the interpreter, torch and the
  weights) above the estimate's weights / gradients / optimizer states /
  activations, stacked;
* ``forgetting.png``: the increase of the reference-text loss against eval loss.

Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

from pathlib import Path

from peftspec.core.errors import PeftspecError

FIGURES = ("loss_curves.png", "quality_vs_params.png", "memory.png", "forgetting.png")
MIB = 1024 * 1024


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise PeftspecError("the figures need matplotlib, which is not installed: "
                            "pip install 'peftspec[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _label_points(ax, xs, ys, names) -> None:
    for x, y, n in zip(xs, ys, names):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def draw(results: dict, out: Path) -> list[Path]:
    """Write every figure into ``out``; return their paths."""
    plt = _plt()
    runs = results["runs"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 5))
    for r in runs:
        tc, ec = r["quality"]["train_curve"], r["quality"]["eval_curve"]
        if r["quality"].get("eval_loss_before") is not None:  # the base, at step 0
            ec = [[0, r["quality"]["eval_loss_before"]], *ec]
        line, = ax_t.plot([p[0] for p in tc], [p[1] for p in tc], linewidth=1, label=r["name"])
        ax_e.plot([p[0] for p in ec], [p[1] for p in ec], "o-", markersize=3,
                  color=line.get_color(), label=r["name"])
    for ax, title in ((ax_t, "train loss"), (ax_e, "eval loss")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_e.legend(fontsize=7)
    save(fig, FIGURES[0])

    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [(r["params"]["trainable"], r["quality"]["eval_loss"], r["name"]) for r in runs
           if r["quality"]["eval_loss"] is not None]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    _label_points(ax, *zip(*pts)) if pts else None
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("final eval loss")
    ax.set_title("quality against parameters trained")
    ax.grid(alpha=0.3, which="both")
    save(fig, FIGURES[1])

    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(runs)))
    parts = (("weights", "tab:blue"), ("gradients", "tab:orange"),
             ("optimizer", "tab:green"), ("activations", "tab:purple"))
    for i, r in enumerate(runs):
        col = r["memory"]["estimate"]["columns"]["full" if r["full"] else "spec"]
        left = 0.0
        for key, color in parts:
            width = (col[key] or 0) / MIB
            ax.barh(i + 0.2, width, left=left, height=0.38, color=color,
                    label=key if i == 0 else None)
            left += width
        peak, loaded = r["memory"]["peak_rss_mb"], r["memory"].get("loaded_rss_mb")
        loaded = min(loaded, peak) if loaded is not None else 0.0
        ax.barh(i - 0.2, loaded, height=0.38, color="silver",
                label="measured: RSS with the model loaded" if i == 0 else None)
        ax.barh(i - 0.2, peak - loaded, left=loaded, height=0.38, color="dimgray",
                label="measured: peak RSS (added in training)" if i == 0 else None)
    ax.set_yticks(range(len(runs)), [r["name"] for r in runs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB (per run: measured peak resident set above, the estimate stacked "
                  "below)")
    ax.set_title("training memory")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    save(fig, FIGURES[2])

    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [(r["quality"]["eval_loss"], r["forgetting"]["increase"], r["name"]) for r in runs
           if r["forgetting"]["increase"] is not None and r["quality"]["eval_loss"] is not None]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:red")
    _label_points(ax, *zip(*pts)) if pts else None
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("final eval loss (lower: learned the task)")
    ax.set_ylabel("reference loss after - before (higher: forgot)")
    ax.set_title("forgetting against quality")
    ax.grid(alpha=0.3)
    save(fig, FIGURES[3])
    return written
