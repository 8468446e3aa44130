"""``peftspec merge``: fold an adapter into its base and write a plain model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from peftspec.cli.common import MODEL_HELP, err, out, registry
from peftspec.merging.stream import merge_to_dir
from peftspec.train.memory import peak_rss_mb


@click.command()
@click.option("--model", "-m", default=None, metavar="M", help=MODEL_HELP)
@click.option("--adapter", "-a", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the peftspec adapter file to fold in")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder to write the merged model to (replaced atomically)")
@click.option("--skip-unmergeable", is_flag=True,
              help="drop methods that cannot fold into weights (adapters, soft prompts)")
@click.option("--allow-nonfinite", is_flag=True, help="merge an adapter holding NaN/Inf")
@click.option("--onto", type=click.Choice(["original", "dequantized"]), default="original",
              show_default=True,
              help="for an adapter trained on a [[freeze]]-quantized base: fold it into the "
                   "checkpoint's own weights, or into them quantized and dequantized (what "
                   "it was trained against)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def merge(model: str | None, adapter: Path, out_dir: Path, skip_unmergeable: bool,
          allow_nonfinite: bool, onto: str, as_json: bool):
    """Fold an adapter into its base model's weights and write a plain model.

    \b
    For an hf: directory the base is streamed tensor by tensor: the output has
    the base's own keys, dtypes and sharding, with its config and tokenizer
    files copied; peak memory stays far below the model's size. Example:
      peftspec merge --model hf:./gpt2 --adapter lora.safetensors --out gpt2-merged
    """
    from rich.progress import Progress


    reg = registry()
    t0 = time.perf_counter()
    with Progress(console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task("merging", total=None)
        summary = merge_to_dir(model, adapter, out_dir, skip_unmergeable=skip_unmergeable,
                               allow_nonfinite=allow_nonfinite, registry=reg, onto=onto,
                               progress=lambda done, total: bar.update(task, completed=done,
                                                                       total=total))

    peak_mb = peak_rss_mb()  # this process's own peak, not one inherited from a parent
    summary = {**summary, "out": str(out_dir), "seconds": time.perf_counter() - t0,
               "peak_rss_mb": peak_mb}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(f"wrote {out_dir}: {summary['tensors']} tensors in {summary['shards']} "
                  f"shard(s) in {summary['seconds']:.1f} s; peak memory {peak_mb:.0f} MB")
        if summary.get("frozen_modules"):
            out.print(f"the adapter's \\[[freeze]] rules name {summary['frozen_modules']} "
                      f"module(s): merged onto the {onto} weights, written densely in the "
                      "checkpoint's dtypes (nothing requantized)", soft_wrap=True)
