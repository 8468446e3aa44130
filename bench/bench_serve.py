"""``peftspec serve`` under load: 32 concurrent clients over 4 LoRA adapters and
the base (SmolLM2-135M-Instruct), 64 new tokens each, against the same requests
served one at a time by the same server.

Each client streams a chat completion through HTTP (uvicorn on a free port, in
this process) with greedy decoding; the figures: aggregate tokens/s (every
generated token over the wall time), time to first token and per-token
latency (p50/p95 over the requests), and the process's peak RSS. The adapters
are random LoRA r=16 on q/v (their values do not change the cost).

Run: python bench/bench_serve.py [--clients 32] [--adapters 4] [--tokens 64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx2 as httpx  # noqa: E402
import torch  # noqa: E402

import peftspec  # noqa: E402
from peftspec.serve.app import Limits  # noqa: E402
from peftspec.serve.server import start  # noqa: E402
from serve_helpers import ThreadServer  # noqa: E402
from shared_helpers import make_adapter  # noqa: E402

LORA = '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.v_proj"]\nr = 16\n'
QUESTIONS = ["Where is the harbour?", "Name three colours.", "What is the capital of France?",
             "Write a line about the sea.", "How do clocks work?", "Why is the sky blue?",
             "What is a river?", "Describe a small town."]


def one(url: str, model: str, question: str, tokens: int) -> dict:
    body = {"model": model, "temperature": 0, "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": question}]}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            obj = json.loads(line[5:])
            if obj.get("usage"):
                usage = obj["usage"]
            elif obj["choices"] and obj["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    n = usage["completion_tokens"]
    return {"ttft": (first or t0) - t0, "per_token": ((last - first) / (n - 1)) if n > 1 and
            first else None, "tokens": n}


def run(url, jobs, tokens, concurrent: bool):
    t0 = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(jobs)) as pool:
            out = list(pool.map(lambda j: one(url, j[0], j[1], tokens), jobs))
    else:
        out = [one(url, m, q, tokens) for m, q in jobs]
    wall = time.perf_counter() - t0
    return out, wall


def pct(values, q):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="8 clients, 16 tokens")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.tokens = 5, 8
    torch.set_num_threads(args.threads)
    reg = peftspec.build_registry()
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    names = [f"a{i}" for i in range(args.adapters)]
    # made on a thread that ends: torch then runs on the engine's thread alone, as
    # in `peftspec serve` (a second OpenMP team slows both: peftspec.serve.engine)
    files = {}
    maker = threading.Thread(target=lambda: files.update(
        {n: make_adapter("smollm2", LORA, folder / f"{n}.safetensors", i, reg, scale=0.02)
         for i, n in enumerate(names)}))
    maker.start()
    maker.join()
    loaded = start("smollm2", files, registry=reg, max_batch=args.clients,
                   max_queue=args.clients, base_name="smollm2")
    server = ThreadServer(loaded, Limits(max_tokens=args.tokens))
    models = ["smollm2", *names]
    jobs = [(models[i % len(models)], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.clients)]
    try:
        run(server.url, jobs[:2], 4, concurrent=False)  # warm-up
        rows = {}
        for label, concurrent in (("one at a time", False), ("batched", True)):
            out, wall = run(server.url, jobs, args.tokens, concurrent)
            total = sum(o["tokens"] for o in out)
            rows[label] = {"tokens": total, "wall_s": wall, "tok_per_s": total / wall,
                           "ttft_p50": pct([o["ttft"] for o in out], .5),
                           "ttft_p95": pct([o["ttft"] for o in out], .95),
                           "tpot_p50": pct([o["per_token"] for o in out], .5),
                           "tpot_p95": pct([o["per_token"] for o in out], .95)}
    finally:
        server.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"SmolLM2-135M-Instruct, {args.clients} clients over the base and {args.adapters} "
          f"LoRA adapters, {args.tokens} new tokens max, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| served | tokens | wall s | tokens/s | TTFT p50 / p95 s | per token p50 / p95 ms |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_per_s']:.1f} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | "
              f"{r['tpot_p50'] * 1e3:.0f} / {r['tpot_p95'] * 1e3:.0f} |")
    print(f"batched / one at a time: {rows['batched']['tok_per_s'] / rows['one at a time']['tok_per_s']:.2f}x"
          f" aggregate tokens/s; peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
