"""The PEFT study of the README: one command, ``python bench/study.py``.

Two comparisons, each one ``peftspec compare`` (so each is resumable: run the
command again after an interruption and the finished runs are read back):

1. **SmolLM2-135M-Instruct** (``--model smollm2``) on the quick start's data
   (60 question/answer pairs about Brindlecombe, an invented town; 10
   paraphrased questions held out for eval), every spec in ``specs/study/``
   plus full fine-tuning: LoRA r 4/8/16/32/64, DoRA, prompt tuning
   initialised randomly / from the vocabulary / from text, prefix tuning,
   BitFit (SmolLM2 has no biases: its RMSNorm scales instead), Houlsby
   adapters, (IA)^3, and LoRA r=16 on an nf4-quantized frozen base (QLoRA)
   when torchao is installed (``pip install 'peftspec[quant]'``; else that
   row is left out and the summary says so).
2. **Prompt tuning against model size**: the three prompt-tuning specs on
   the built-in tiny model (a 0.86M-parameter byte-level nanoGPT) after the
   study pretrains it briefly on ``data/reference.txt`` (every parameter, a
   few hundred steps: a toy that has seen a few kilobytes of English, not a
   language model), against the same specs on SmolLM2.

Everything is written under ``--out`` (default ``study-out/``):
``smollm2/`` and ``tiny/`` (each a ``peftspec compare`` folder with
``results.json`` and figures) and ``study.json`` (timings, load average).
``--rows NAME`` (repeatable) runs a subset of the SmolLM2 rows (a reduced
study); ``--quick`` is a smoke test (2 steps, three rows), not the study.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchenv import loadavg  # noqa: E402

STUDY = ROOT / "specs" / "study"
SMOLLM2_ROWS = ["lora-r4", "lora-r8", "lora-r16", "lora-r32", "lora-r64", "dora-r16",
                "prompt-random", "prompt-vocab", "prompt-text", "prefix-tuning",
                "bitfit-norms", "houlsby", "ia3", "lora-r16-nf4", "full"]
PROMPT_ROWS = ["prompt-random", "prompt-vocab", "prompt-text"]
# the order runs are made in, so that an interrupted study has the rows the claims
# hinge on first, then one of each kind before the rest of the rank sweep; the
# table lists them in SMOLLM2_ROWS order
PRIORITY = ["lora-r16", "prompt-text", "full"]
THEN = ["lora-r4", "bitfit-norms", "lora-r64", "houlsby", "prompt-random", "dora-r16",
        "prefix-tuning", "prompt-vocab", "lora-r8", "lora-r32", "ia3", "lora-r16-nf4"]
NF4_ROW = "lora-r16-nf4"  # needs torchao (peftspec[quant])
COMMON = ["--data", "data/brindlecombe-train.jsonl", "--eval", "data/brindlecombe-heldout.jsonl",
          "--batch-size", "8", "--warmup", "5", "--seed", "0"]
FULL_SPEC = '[spec]\nname = "pretrain"\n\n[[train]]\nparams = ["**"]\n'


def peftspec(*args: str, env: dict | None = None) -> int:
    cmd = [sys.executable, "-c", "from peftspec.cli import main; main()", *args]
    print("$ peftspec " + " ".join(args), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env={**os.environ, **(env or {})})


def torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def pretrain_tiny(out: Path, steps: int, env: dict) -> Path:
    """The tiny model's brief pretraining on the reference text (once)."""
    adapter = out / "tiny-pretrained.safetensors"
    if adapter.is_file():
        print(f"tiny model: pretrained weights read back from {adapter}")
        return adapter
    spec = out / "tiny-pretrain.toml"
    spec.write_text(FULL_SPEC)
    rc = peftspec("train", str(spec), "--data", "data/reference.txt", "--steps", str(steps),
                  "--batch-size", "8", "--max-length", "256", "--lr", "3e-3", "--warmup", "20",
                  "--checkpoint-dir", str(out / "tiny-pretrain.checkpoints"),
                  "--log", str(out / "tiny-pretrain.jsonl"), "--out", str(adapter), env=env)
    if rc != 0:
        sys.exit(f"pretraining the tiny model failed (exit {rc})")
    return adapter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "study-out")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--rows", action="append", choices=SMOLLM2_ROWS,
                    help="only these SmolLM2 rows (repeatable): a reduced study")
    ap.add_argument("--only", action="append", choices=["smollm2", "tiny"])
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 steps, three rows")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (OMP_NUM_THREADS) [default: torch's own]")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps, pretrain = (2, 5) if args.quick else (args.steps, args.pretrain_steps)
    rows = args.rows or (["lora-r4", "prompt-text", "full"] if args.quick else SMOLLM2_ROWS)
    parts = args.only or ["smollm2", "tiny"]
    notes = []
    if NF4_ROW in rows and not torchao_installed():
        rows = [r for r in rows if r != NF4_ROW]
        notes.append(f"{NF4_ROW} left out: torchao is not installed "
                     "(pip install 'peftspec[quant]')")
    settings = [*COMMON, "--steps", str(steps), "--eval-every", str(max(1, steps // 10))]
    started, timings = time.time(), {}
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    load_start = loadavg()

    def smollm2(wanted: list[str]) -> int:
        t0 = time.perf_counter()
        specs = [f"specs/study/{r}.toml" for r in wanted if r != "full"]
        extra = ["--full", "--full-lr", "1e-4"] if "full" in wanted else []
        rc = peftspec("compare", *specs, *extra, "--model", "smollm2", *settings,
                      "--max-length", "128", "--probe", "data/study-probe.jsonl",
                      "--out", str(out / "smollm2"), env=threads)
        timings["smollm2_s"] = timings.get("smollm2_s", 0.0) + time.perf_counter() - t0
        return rc

    # the headline rows first (a comparison reads finished runs back, so the second
    # pass repeats none of them): an interrupted study has those at least
    first = [r for r in PRIORITY if r in rows]
    if "smollm2" in parts and first and len(first) < len(rows):
        rc = smollm2(first)
        if rc not in (0, 1):
            return rc
    if "tiny" in parts:
        t0 = time.perf_counter()
        adapter = pretrain_tiny(out, pretrain, threads)
        timings["tiny_pretrain_s"] = time.perf_counter() - t0
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"),
                                                           os.environ.get("PYTHONPATH")])),
               "PEFTSPEC_STUDY_TINY": str(adapter)}
        rc = peftspec("compare", *[f"specs/study/{r}.toml" for r in PROMPT_ROWS],
                      "--model", "py:study_models:pretrained_tiny", *settings,
                      "--max-length", "192", "--out", str(out / "tiny"), env={**env, **threads})
        timings["tiny_s"] = time.perf_counter() - t0
        if rc not in (0, 1):
            return rc
    if "smollm2" in parts:
        rest = [r for r in THEN if r in rows and r not in first]
        # the rest in THEN's order, then every row once more in the table's order
        # (all read back): results.json and the figures hold the whole study
        for wave in ([r for r in rows if r not in first and r not in rest] + rest, rows):
            if not wave:
                continue
            rc = smollm2(wave)
            if rc not in (0, 1):
                return rc
    summary = {"threads": args.threads, "steps": steps, "rows": rows, "notes": notes, "timings": timings,
               "wall_s": time.time() - started, "loadavg_start": load_start,
               "loadavg_end": loadavg(), "quick": args.quick}
    (out / "study.json").write_text(json.dumps(summary, indent=1))
    print_size_comparison(out)
    for n in notes:
        print("note:", n)
    print(f"study: {summary['wall_s']:.0f} s, load average {load_start} -> "
          f"{summary['loadavg_end']}; results under {out}")
    return 0


def print_size_comparison(out: Path) -> None:
    """Prompt tuning on the tiny model against SmolLM2: the held-out loss before
    and after, and its relative drop (the losses are per byte for the tiny
    model and per token for SmolLM2, so only the relative drop compares)."""
    rows = []
    for model in ("tiny", "smollm2"):
        path = out / model / "results.json"
        if not path.is_file():
            continue
        for r in json.loads(path.read_text())["runs"]:
            if r["name"] in PROMPT_ROWS:
                q = r["quality"]
                if q.get("eval_loss_before") and q["eval_loss"] is not None:
                    rows.append((model, r["name"], q["eval_loss_before"], q["eval_loss"]))
    if not rows:
        return
    print("\nprompt tuning against model size (held-out loss; per byte on the tiny model, "
          "per token on SmolLM2)")
    print("| model | init | before | after | relative drop |\n|---|---|---|---|---|")
    for model, name, before, after in rows:
        label = "tiny (0.86M, byte-level, pretrained briefly here)" if model == "tiny" \
            else "SmolLM2-135M-Instruct"
        print(f"| {label} | {name.removeprefix('prompt-')} | {before:.3f} | {after:.3f} | "
              f"{(before - after) / before:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
