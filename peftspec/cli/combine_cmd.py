"""``peftspec combine``: adapter arithmetic over LoRA adapter files of one base."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from peftspec.merging.combine_math import METHODS, SIGN_METHODS
from peftspec.cli.common import MODEL_HELP, err, out, registry
from peftspec.merging.combine import combine as run_combine, parse_weights


@click.command()
@click.argument("adapters", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--weights", "-w", required=True, metavar="W1,W2,...",
              help="one weight per adapter, comma-separated (negative subtracts)")
@click.option("--method", required=True, type=click.Choice(METHODS),
              help="linear: Σ wᵢ·ΔWᵢ exactly, SVD form; cat: the same by concatenation; "
                   "svd: its best rank-R approximation; ties / dare_linear / dare_ties: on "
                   "the dense ΔWᵢ, then rank R")
@click.option("--density", type=float, default=None,
              help="fraction of each update's entries kept (ties, dare_*; required there)")
@click.option("--rank", type=int, default=None,
              help="output rank R [default: Σ rᵢ for linear, the largest rᵢ otherwise; "
                   "capped at min(out, in) per module; not for cat]")
@click.option("--seed", type=int, default=0, show_default=True, help="seeds the DARE masks")
@click.option("--majority-sign", type=click.Choice(SIGN_METHODS), default="total",
              show_default=True, help="TIES's sign election: by summed value or by count")
@click.option("--model", "-m", default=None, metavar="M",
              help="optional: resolve and check the adapters against this base; " + MODEL_HELP)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the combined adapter file to write (atomically)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def combine(adapters, weights, method, density, rank, seed, majority_sign, model, out_path,
            as_json):
    """Combine LoRA adapters of one base into one adapter file.

    \b
    Every method is defined on the full update ΔW = Σ wᵢ·ΔWᵢ, each input's
    scale (alpha/r, rsLoRA, per rule) folded in exactly; a module some
    inputs lack gets zero from them. Refused, naming file and rule: other
    bases, DoRA, and methods other than LoRA. Examples:
      peftspec combine a.safetensors b.safetensors --weights 0.7,0.3 \\
          --method svd --rank 8 --out ab.safetensors
      peftspec combine a.safetensors b.safetensors -w 1,1 --method ties \\
          --density 0.2 --out ab.safetensors
    """

    reg = registry()
    ws = parse_weights(weights, len(adapters))
    with contextlib.nullcontext() if as_json else err.status("combining..."):
        summary = run_combine(adapters, ws, method=method, out=out_path, density=density,
                              rank=rank, seed=seed, majority_sign=majority_sign, model=model,
                              registry=reg)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    ranks = ", ".join(f"r={r}: {n}" for r, n in summary["ranks"].items())
    out.print(f"wrote {out_path}: {method} of {len(adapters)} adapter(s), "
              f"{summary['targets']} modules ({ranks}), {summary['params']:,} parameters")
    if summary["max_truncation_error"] > 0:
        out.print(f"largest relative truncation error ‖ΔW − B'A'‖/‖ΔW‖: "
                  f"{summary['max_truncation_error']:.3g}")
