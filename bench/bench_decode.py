"""Decoding cost: time per new token on SmolLM2-135M-Instruct for the base and
for adapters served unmerged, merged, and over an nf4-frozen base.

Configurations (each its own model, loaded as ``peftspec serve`` loads it:
:func:`peftspec.serve.server.start`):

- ``base fp32``: the plain model;
- ``LoRA``: a LoRA r=16 adapter on all seven projections, unmerged;
- ``DoRA``: the same with ``dora = true``, unmerged;
- ``nf4 base``: the seven projections ``[[freeze]] nf4`` (no adapter);
- ``nf4 + LoRA``: the LoRA adapter served on that nf4 base;
- ``LoRA merged``: the LoRA adapter folded into the fp32 base (``serve --merge``).

Adapters are random (every trainable tensor, ``lora_B`` included, moved off
its init: they are not no-ops). Greedy decoding after a short chat prompt,
with the key/value cache, ``--tokens`` new tokens (no stop token ends a row
early), through two code paths:

- ``generate``: :func:`peftspec.generate.adapters_for` around transformers'
  ``generate()``, as ``peftspec generate`` decodes; the time per token is
  from the first new token to the last (a streamer stamps each), so the
  prefill is not in it;
- ``engine``: the server's scheduler (:class:`peftspec.serve.engine.Engine`),
  requests submitted directly (no HTTP); per token: from the first token to
  the request's end, over the tokens after the first.

Configurations are interleaved round by round (the order rotates), each
loaded afresh on its engine's thread, warmed up (4 tokens), timed and closed,
so that one thread at a time runs torch, as in a server; the table gives each one's median over the rounds with the
min-max, and the median of the per-round ratios to ``base fp32``.

Run: python bench/bench_decode.py [--rounds 7] [--tokens 64] [--batch 1 --batch 8]
     [--path generate --path engine] [--only LoRA --only DoRA] [--threads 2] [--json F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

import peftspec  # noqa: E402
from benchenv import cpu_name, loadavg  # noqa: E402
from peftspec.generate import adapters_for  # noqa: E402
from peftspec.serve.engine import Request  # noqa: E402
from peftspec.serve.server import start  # noqa: E402
from shared_helpers import make_adapter  # noqa: E402

PROJ = ('modules = ["**.q_proj", "**.k_proj", "**.v_proj", "**.o_proj", '
        '"**.gate_proj", "**.up_proj", "**.down_proj"]\n')
LORA = '[[reparameterize]]\nmethod = "lora"\n' + PROJ + "r = 16\nalpha = 32\n"
DORA = LORA + "dora = true\n"
NF4 = '[[freeze]]\nmethod = "nf4"\n' + PROJ + "scaler_block_size = 64\n"
CONFIGS = ("base fp32", "LoRA", "DoRA", "nf4 base", "nf4 + LoRA", "LoRA merged")
QUESTIONS = ["Where is the harbour?", "Name three colours.", "What is the capital of France?",
             "Write a line about the sea.", "How do clocks work?", "Why is the sky blue?",
             "What is a river?", "Describe a small town."]


class _Stamps:
    """transformers' streamer protocol: the time of every new token's arrival."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def build(label: str, files: dict[str, Path], reg):
    """``(engine, adapter name or None)`` for one configuration, loaded as serve loads it:
    everything on the engine's own thread (``peftspec.serve.engine``).

    The server refuses an adapter whose spec has ``[[freeze]]`` rules (they do
    not run per row), so the nf4 base is frozen first (a spec of only the
    ``[[freeze]]`` rule) and the LoRA file loaded on it."""
    file = "dora" if label == "DoRA" else "lora"
    if label == "LoRA merged":
        return start("smollm2", {file: files[file]}, registry=reg, max_batch=64,
                     merge=True).engine, None
    engine = start("smollm2", {}, registry=reg, max_batch=64).engine
    if label.startswith("nf4"):
        engine.call(lambda: peftspec.apply(peftspec.parse_spec(NF4), engine.model,
                                           registry=reg))
    if label in ("base fp32", "nf4 base"):
        return engine, None
    engine.call(lambda: engine.adapters.load(file, files[file]))
    return engine, file


def prompts(engine, batch: int) -> list[list[int]]:
    return [engine.tokenizer.encode_chat(QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]


def time_generate(engine, adapter, batch: int, tokens: int) -> float:
    """Seconds per decoding step (one new token for every row), generate's path."""
    rows = prompts(engine, batch)
    width = max(len(r) for r in rows)
    pad = engine.tokenizer.pad_id
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    stamps = _Stamps()
    with torch.no_grad(), adapters_for(engine.model, [adapter] * batch):
        engine.model.generate(input_ids=ids, attention_mask=mask, streamer=stamps,
                              max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    if len(stamps.times) != tokens:
        raise RuntimeError(f"generate made {len(stamps.times)} tokens, not {tokens}")
    return (stamps.times[-1] - stamps.times[0]) / (tokens - 1)


def time_engine(engine, adapter, batch: int, tokens: int) -> float:
    """Seconds per decoding step, the server's scheduler: ``batch`` requests at once."""
    stops, engine.stops = engine.stops, set()  # every request runs its ``tokens``
    done, ended, errors = threading.Event(), [], []

    def on_done(reason, error):
        ended.append(time.monotonic())
        if error is not None or reason != "length":
            errors.append(f"{reason}: {error}")
        if len(ended) == batch:
            done.set()

    reqs = [Request(p, adapter, tokens, on_text=lambda _t: None, on_done=on_done)
            for p in prompts(engine, batch)]
    try:
        with engine.lock:  # all admitted in one step: prefilled, then decoded together
            for r in reqs:  # (submit takes the same reentrant lock)
                engine.submit(r)
        if not done.wait(600):
            raise RuntimeError("the engine did not finish in 10 minutes")
    finally:
        engine.stops = stops
    if errors:
        raise RuntimeError(f"engine requests failed: {errors}")
    first = max(r.first_token_at for r in reqs)
    return (max(ended) - first) / (tokens - 1)


def on_a_thread(fn):
    """``fn()`` on a thread of its own that then ends (its OpenMP team with it)."""
    box = {}
    t = threading.Thread(target=lambda: box.update(out=fn()))
    t.start()
    t.join()
    return box["out"]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (>= 5 for the README)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per row")
    ap.add_argument("--batch", type=int, action="append", help="rows (repeatable; default 1)")
    ap.add_argument("--path", action="append", choices=("generate", "engine"),
                    help="code path (repeatable; default both)")
    ap.add_argument("--only", action="append", choices=CONFIGS,
                    help="configurations (repeatable; base fp32 always runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write every measurement to this file")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.tokens < 2:
        ap.error("need --rounds >= 1 and --tokens >= 2")
    batches, paths = args.batch or [1], args.path or ["generate", "engine"]
    labels = [c for c in CONFIGS if c == "base fp32" or not args.only or c in args.only]
    torch.set_num_threads(args.threads)
    t0, load0 = time.time(), loadavg()
    reg = peftspec.build_registry()
    folder = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    # torch runs on one thread at a time, as in a server: the main thread's own
    # OpenMP team beside an engine's would slow both (peftspec.serve.engine)
    files = on_a_thread(lambda: {
        "lora": make_adapter("smollm2", LORA, folder / "lora.safetensors", 1, reg, 0.02),
        "dora": make_adapter("smollm2", DORA, folder / "dora.safetensors", 2, reg, 0.02)})
    timers = {"generate": lambda e, *a: e.call(lambda: time_generate(e, *a)),
              "engine": time_engine}
    cases = [(p, b) for p in paths for b in batches]
    times = {(label, p, b): [] for label in labels for p, b in cases}
    for rnd in range(1, args.rounds + 1):
        order = labels[rnd % len(labels):] + labels[:rnd % len(labels)]
        for label in order:  # one engine at a time, loaded afresh, warmed up, closed
            engine, adapter = build(label, files, reg)
            try:
                for p, b in cases:
                    timers[p](engine, adapter, b, 4)
                    times[(label, p, b)].append(timers[p](engine, adapter, b, args.tokens))
            finally:
                engine.close()
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"{when} | {cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads | torch "
          f"{torch.__version__}, Python {platform.python_version()} | load avg {load0} -> "
          f"{loadavg()} | {time.time() - t0:.0f} s")
    print("command: python bench/bench_decode.py " + " ".join(sys.argv[1:] if argv is None
                                                            else argv))
    print(f"SmolLM2-135M-Instruct, greedy, {args.tokens} new tokens, {args.rounds} rounds; "
          "ms per decoding step (one token per row): median (min-max); ratio: median of "
          "the per-round ratios to base fp32 (min-max)")
    results = []
    for p, b in cases:
        print(f"\n| path {p}, batch {b} | ms / step | ratio to base fp32 |\n|---|---|---|")
        base = times[("base fp32", p, b)]
        for label in labels:
            ts = times[(label, p, b)]
            ms, ratio = summary([t * 1e3 for t in ts]), summary([t / u for t, u in zip(ts, base)])
            results.append({"config": label, "path": p, "batch": b, "ms": ms, "ratio": ratio,
                            "seconds": ts})
            print(f"| {label} | {ms['median']:.1f} ({ms['min']:.1f}-{ms['max']:.1f}) | "
                  f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": when, "cpu": cpu_name(),
                                               "threads": args.threads, "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
