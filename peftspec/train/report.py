"""Loss and learning-rate curves from a metrics log (``peftspec report``).

Needs matplotlib, the optional extra ``plot``: ``pip install 'peftspec[plot]'``.
"""

from __future__ import annotations

from pathlib import Path

from peftspec.core.errors import PeftspecError
from peftspec.train.metrics import read


class ReportError(PeftspecError):
    exit_code = 2


def render(metrics: str | Path, out: str | Path, title: str | None = None) -> dict:
    """Draw train/eval loss (and a classifier's eval accuracy) and lr against steps
    into ``out`` (png, svg, pdf...)."""
    try:
        import matplotlib
    except ImportError:
        raise PeftspecError("peftspec report draws with matplotlib, which is not installed: "
                            "pip install 'peftspec[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(metrics)
    if not path.is_file():
        raise ReportError(f"{path}: no such metrics file")
    records = read(path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        raise ReportError(f"{path}: no train or eval records (write one with "
                          "`peftspec train --log FILE`)")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(7, 6),
                                         gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss",
                     linewidth=1)
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-",
                     label="eval loss", color="tab:orange")
    accuracy = [r for r in evals if isinstance(r.get("accuracy"), (int, float))]
    handles, names = ax_loss.get_legend_handles_labels()
    if accuracy:  # a classifier's: on its own axis, 0 to 1
        ax_acc = ax_loss.twinx()
        line, = ax_acc.plot([r["step"] for r in accuracy], [r["accuracy"] for r in accuracy],
                            "s--", color="tab:purple", label="eval accuracy")
        ax_acc.set_ylim(0, 1.02)
        ax_acc.set_ylabel("accuracy")
        handles, names = handles + [line], names + ["eval accuracy"]
    ax_loss.set_ylabel("loss")
    ax_loss.legend(handles, names)
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    ax_loss.set_title(title or path.name)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"out": str(out), "train_points": len(train), "eval_points": len(evals)}
