"""Training benchmarks: `peftspec train` itself, on GPT-2 small, batch 4x256, on the CPU.

Two parts (see bench/README.md for how to read them):

1. **throughput**: training tokens/s of LoRA r=16 (alpha 32, ``c_attn``,
   ``c_proj``, ``c_fc``): the real ``peftspec train`` command (a subprocess,
   progress bar drawn on a pseudo-terminal) against a plain PyTorch loop over
   HF PEFT's model (``get_peft_model``, AdamW on the trainable parameters,
   forward / backward / step / zero_grad in a function; a subprocess too), same model
   directory, tokenizer and data, same 4x256 batches. Per-step tokens/s: from
   peftspec's ``--log`` (``tokens_per_s``), and the plain loop's own step
   times; the first steps of each run are dropped (warm-up), medians. Runs
   alternate order round by round. Goal: peftspec / HF >= 1.0x.
2. **memory**: ``peftspec train`` for full fine-tuning (``[[train]] params =
   ["**"]``) and for the LoRA spec, a few steps each: the peak RSS the command
   reports, beside the estimate of ``peftspec memory --json`` (weights,
   gradients, AdamW states, activations), and the RSS of a process that only
   imports torch, transformers and peftspec (the interpreter's share of every
   measured peak) and of one that also loads the model.

Everything is built here, offline: GPT-2 small from ``GPT2Config()`` with random
weights (seeded) saved with ``save_pretrained`` into a temporary directory,
beside a byte-level BPE tokenizer trained with ``tokenizers`` on text made from
``data/harbour.txt``; the data file's examples are all longer than 256 tokens,
so every batch is full.

Run ``python bench/bench_train.py`` (about 7 minutes on 2 quiet cores),
``--only throughput`` / ``--only memory`` for one part, ``--quick`` for a smoke
test (a tiny GPT-2, about a minute), ``--json`` for every measurement after
the tables.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import pty
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchenv import cpu_name, header, loadavg, status_mb

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["c_attn", "c_proj", "c_fc"]
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Settings:
    gpt2: dict | None = None   # GPT2Config overrides; None: GPT-2 small
    batch: int = 4
    seq: int = 256
    rounds: int = 3            # peftspec / HF pairs, order alternating
    steps: int = 8             # optimizer steps per throughput run
    drop: int = 2              # warm-up steps dropped from each run
    mem_steps: int = 3         # steps per memory run (AdamW states exist from step 1)
    examples: int = 64
    words: int = 400           # words per example (~450 tokens with the trained BPE)
    lr: float = 1e-4
    quick: bool = False


QUICK = Settings(quick=True, gpt2={"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 2048,
                       "n_positions": 256},
                 batch=2, seq=64, rounds=1, steps=4, drop=1, mem_steps=2, examples=16,
                 words=120)


# ---------------------------------------------------------------- setup
def lora_spec(r: int = 16, alpha: int = 32) -> str:
    return ("[spec]\nname = \"lora-r16\"\n\n[[reparameterize]]\nmethod = \"lora\"\n"
            f"modules = {json.dumps(['**.' + t for t in TARGETS])}\n"
            f"r = {r}\nalpha = {alpha}\ndropout = 0.0\n")


FULL_SPEC = '[spec]\nname = "full"\n\n[[train]]\nparams = ["**"]\n'


def setup(work: Path, s: Settings) -> dict:
    """The model directory (weights + tokenizer), the data file and the two specs.

    Runs in a subprocess (``--setup-child``): the parent imports no torch and
    stays small, because on Linux a child's ``ru_maxrss`` starts from its
    parent's peak RSS at fork/exec (the kernel carries the high-water mark of
    the old address space over ``exec``), so a fat parent would inflate every
    peak measured below."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model_dir = work / "gpt2"
    text = (REPO / "data" / "harbour.txt").read_text(encoding="utf-8")
    words = text.split()
    rng = random.Random(0)
    docs = [" ".join(rng.choice(words) for _ in range(s.words)) for _ in range(s.examples)]

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text] + docs, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS)

    torch.manual_seed(0)
    cfg = GPT2Config(**(s.gpt2 or {}))
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert len(tok) <= cfg.vocab_size, (len(tok), cfg.vocab_size)
    lengths = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    assert min(lengths) >= s.seq, f"an example has only {min(lengths)} tokens (< {s.seq})"
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (work / "lora.toml").write_text(lora_spec(), encoding="utf-8")
    (work / "full.toml").write_text(FULL_SPEC, encoding="utf-8")
    return {"model_dir": str(model_dir), "data": str(data), "params": n_params,
            "layers": cfg.n_layer, "vocab_size": cfg.vocab_size, "tokenizer_vocab": len(tok),
            "example_tokens_min": min(lengths)}


def setup_in_subprocess(work: Path, s: Settings, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--setup-child", str(work)] + \
        (["--quick"] if s.quick else [])
    return json.loads(run_child(cmd, threads)["stdout"].strip().splitlines()[-1])


# ---------------------------------------------------------------- subprocesses
# glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold for
# reuse: RSS then includes free memory. A fixed small threshold returns every
# large block to the kernel when freed, so the peak is closer to the live tensors.
TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def child_env(threads: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "RANK", *TRIM_ENV):
        env.pop(key, None)
    env.update(extra or {})
    return env


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of a running process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def run_child(cmd: list[str], threads: int, tty: bool = False,
              watch_log: Path | None = None, env_extra: dict | None = None) -> dict:
    """Run ``cmd``; its stdout, stderr (on a pseudo-terminal when ``tty``), exit
    status, wall time and peak RSS (the child's ``ru_maxrss``, from ``wait4``).

    With ``watch_log``, the child's CPU time is sampled (every 20 ms) each time
    a line is added to that file: ``cpu_at_line[k]`` is the CPU time when line
    ``k + 1`` had been written, and ``wall_at_line[k]`` the seconds since the start."""
    env = child_env(threads, env_extra)
    chunks: list[bytes] = []
    if tty:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env["TERM"] = env.get("TERM") or "xterm"
        env["COLUMNS"] = "120"
        stderr = slave
    else:
        stderr = subprocess.PIPE
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=REPO)
    if tty:
        os.close(slave)
        read_fd = master
    else:
        read_fd = p.stderr.fileno()

    def drain():
        while True:
            try:
                b = os.read(read_fd, 65536)
            except OSError:  # EIO: the child closed its terminal
                return
            if not b:
                return
            chunks.append(b)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    done = threading.Event()
    cpu_at_line: list[float | None] = []
    wall_at_line: list[float] = []

    def watch():
        seen = 0
        while not done.wait(0.02):
            n = _count_lines(watch_log)
            if n > seen:
                cpu = _cpu_s(p.pid)
                cpu_at_line.extend([None] * (n - seen - 1) + [cpu])
                wall_at_line.extend([time.perf_counter() - t0] * (n - seen))
                seen = n
    watcher = threading.Thread(target=watch, daemon=True)
    if watch_log is not None:
        watcher.start()
    stdout = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)  # reaped here (for its rusage), not by Popen
    done.set()
    if watch_log is not None:
        watcher.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    if tty:
        os.close(master)
    for f in (p.stdout, p.stderr):
        if f:
            f.close()
    stderr_text = b"".join(chunks).decode("utf-8", errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nexited with {p.returncode}:\n"
                           f"{stdout.decode(errors='replace')[-2000:]}\n{stderr_text[-3000:]}")
    return {"stdout": stdout.decode("utf-8", errors="replace"), "stderr": stderr_text,
            "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "cpu_at_line": cpu_at_line,
            "wall_at_line": wall_at_line}


def peftspec_exe() -> str:
    here = Path(sys.executable).parent / "peftspec"
    return str(here) if here.exists() else (shutil.which("peftspec") or "peftspec")


def safetensors_numel(path: Path) -> int:
    """Elements stored in a safetensors file (its header only; no torch needed)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    total = 0
    for key, v in header.items():
        if key != "__metadata__":
            size = 1
            for d in v["shape"]:
                size *= d
            total += size
    return total


def last_json(stdout: str) -> dict:
    """The JSON object a command printed last (``peftspec ... --json`` pretty-prints)."""
    start = stdout.rfind("\n{") + 1 if not stdout.lstrip().startswith("{") else \
        stdout.index("{")
    return json.loads(stdout[start:])


def peftspec_train(work: Path, setup_info: dict, s: Settings, spec: str, steps: int,
                   tag: str, threads: int, env_extra: dict | None = None) -> dict:
    """``peftspec train`` as a user runs it; its summary, log records and peak RSS."""
    log = work / f"{tag}.metrics.jsonl"
    cmd = [peftspec_exe(), "train", str(work / spec), "--model", f"hf:{setup_info['model_dir']}",
           "--data", setup_info["data"], "--batch-size", str(s.batch),
           "--max-length", str(s.seq), "--steps", str(steps), "--lr", str(s.lr),
           "--log", str(log), "--out", str(work / f"{tag}.safetensors"), "--json"]
    res = run_child(cmd, threads, tty=True, watch_log=log, env_extra=env_extra)
    records = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    train = [r for r in records if r.get("type") == "train"]
    assert len(train) == steps and records[:steps] == train, (len(train), steps)
    step_tps = [r["tokens_per_s"] for r in train]
    tokens = [r["tokens"] - (train[i - 1]["tokens"] if i else 0) for i, r in enumerate(train)]
    # wall tokens/s: step to step, everything between (log, progress bar) included
    times = [r["time"] for r in train]
    wall_tps = [tokens[i] / (times[i] - (times[i - 1] if i else 0.0)) for i in range(steps)]
    # tokens per CPU-second, step to step (sampled when each log line appeared)
    cpu = res["cpu_at_line"][:steps]
    cpu_tps = [tokens[i] / (cpu[i] - cpu[i - 1]) if i and None not in (cpu[i], cpu[i - 1])
               and cpu[i] > cpu[i - 1] else None for i in range(len(cpu))]
    return {"cmd": cmd, "summary": last_json(res["stdout"]), "step_tokens_per_s": step_tps,
            "wall_tokens_per_s": wall_tps, "cpu_tokens_per_s": cpu_tps,
            "tokens_per_step": tokens,
            "losses": [r["loss"] for r in train], "peak_rss_mb": res["peak_rss_mb"],
            "wall_s": res["wall_s"], "cpu_s": res["cpu_s"],
            "trainable": safetensors_numel(work / f"{tag}.safetensors"),
            "progress_bar_drawn": "tok/s" in res["stderr"]}


def hf_train(work: Path, setup_info: dict, s: Settings, steps: int, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--hf-child", str(work),
           "--steps", str(steps), "--threads", str(threads)] + (["--quick"] if s.quick else [])
    res = run_child(cmd, threads)
    out = json.loads(res["stdout"].strip().splitlines()[-1])
    out.update(peak_rss_mb=res["peak_rss_mb"], wall_s=res["wall_s"], cpu_s=res["cpu_s"])
    return out


def hf_child(work: Path, s: Settings, steps: int, threads: int) -> dict:
    """A plain PyTorch loop over HF PEFT's LoRA model (runs in its own process)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.set_num_threads(threads)
    model_dir = work / "gpt2"
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    texts = [json.loads(ln)["text"] for ln in (work / "data.jsonl").read_text().splitlines()]
    # as peftspec encodes: the text's tokens, then end-of-text, cut to the length
    rows = [(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:s.seq]
            for t in texts]
    ids = torch.tensor(rows, dtype=torch.long)
    batches = [ids[i:i + s.batch] for i in range(0, len(rows) - s.batch + 1, s.batch)]

    rss = {"imports_data": status_mb("VmRSS")}
    model = GPT2LMHeadModel.from_pretrained(model_dir, local_files_only=True)
    rss["model_loaded"] = status_mb("VmRSS")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=TARGETS, fan_in_fan_out=True))
    model.train()
    rss["peft_applied"] = status_mb("VmRSS")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    def step(batch: dict) -> float:
        # a function, so that the loss and the outputs are freed before the next
        # forward (a loop that keeps `loss` alive into the next iteration peaks
        # ~2 GB higher here, with either library's model)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step_tps, cpu_tps, losses = [], [], []
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        x = batches[i % len(batches)]
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
        losses.append(step(batch))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        step_tps.append(int(batch["attention_mask"].sum()) / dt)
        cpu_tps.append(int(batch["attention_mask"].sum()) / dc)
        if i == 0:
            rss["peak_after_step_1"] = status_mb("VmHWM")
    rss["peak_end"] = status_mb("VmHWM")
    return {"step_tokens_per_s": step_tps, "wall_tokens_per_s": step_tps,
            "cpu_tokens_per_s": cpu_tps, "losses": losses,
            "trainable": sum(p.numel() for p in params), "rss_mb": rss}


# ---------------------------------------------------------------- 1. throughput
def bench_throughput(work: Path, info: dict, s: Settings, threads: int) -> dict:
    runs = {"peftspec": [], "hf": []}
    for i in range(s.rounds):
        order = ["peftspec", "hf"] if i % 2 == 0 else ["hf", "peftspec"]
        for v in order:
            print(f"[bench] throughput round {i + 1}/{s.rounds}: {v} ...", file=sys.stderr,
                  flush=True)
            if v == "peftspec":
                runs[v].append(peftspec_train(work, info, s, "lora.toml", s.steps,
                                              f"lora-{i}", threads))
            else:
                runs[v].append(hf_train(work, info, s, s.steps, threads))
    n = {v: rs[0]["trainable"] for v, rs in runs.items()}
    assert n["peftspec"] == n["hf"], f"different trainable parameter counts: {n}"
    kept = {v: [x for r in rs for x in r["step_tokens_per_s"][s.drop:]] for v, rs in runs.items()}
    wall = {v: [x for r in rs for x in r["wall_tokens_per_s"][s.drop:]] for v, rs in runs.items()}
    cpu = {v: [x for r in rs for x in r["cpu_tokens_per_s"][s.drop:] if x]
           for v, rs in runs.items()}
    med = {v: statistics.median(x) for v, x in kept.items()}
    cmed = {v: statistics.median(x) if x else float("nan") for v, x in cpu.items()}
    wmed = {v: statistics.median(x) for v, x in wall.items()}
    # per round: the ratio of that round's two medians (the pair ran back to back)
    paired = [statistics.median(p["step_tokens_per_s"][s.drop:]) /
              statistics.median(h["step_tokens_per_s"][s.drop:])
              for p, h in zip(runs["peftspec"], runs["hf"])]
    return {"runs": runs, "median_tokens_per_s": med, "ratio": med["peftspec"] / med["hf"],
            "wall_median_tokens_per_s": wmed, "wall_ratio": wmed["peftspec"] / wmed["hf"],
            "round_ratios": paired,
            "best_ratio": max(kept["peftspec"]) / max(kept["hf"]),
            "cpu_median_tokens_per_s": cmed, "cpu_ratio": cmed["peftspec"] / cmed["hf"],
            "peak_rss_mb": {v: statistics.median(r["peak_rss_mb"] for r in rs)
                            for v, rs in runs.items()},
            "steps_kept": {v: len(x) for v, x in kept.items()},
            "progress_bar_drawn": all(r["progress_bar_drawn"] for r in runs["peftspec"]),
            "trainable": {v: rs[0]["trainable"] for v, rs in runs.items()}}


# ---------------------------------------------------------------- 2. memory
BASELINE = "import torch, transformers, peftspec"
LOADED = ("import sys, torch, transformers, peftspec; "
          "m = peftspec.load_model('hf:' + sys.argv[1])")


def bench_memory(work: Path, info: dict, s: Settings, threads: int) -> dict:
    exe = peftspec_exe()
    model = f"hf:{info['model_dir']}"
    print("[bench] memory: estimates ...", file=sys.stderr, flush=True)
    est = last_json(run_child([exe, "memory", str(work / "lora.toml"), "--model", model,
                               "--batch-size", str(s.batch), "--seq-len", str(s.seq),
                               "--json"], threads)["stdout"])
    est_full = last_json(run_child([exe, "memory", str(work / "full.toml"), "--model", model,
                                    "--batch-size", str(s.batch), "--seq-len", str(s.seq),
                                    "--json"], threads)["stdout"])
    # the full-FT spec's own column must equal the table's full fine-tuning column
    assert est_full["columns"]["spec"]["trainable"] == est["columns"]["full"]["trainable"]
    print("[bench] memory: baselines ...", file=sys.stderr, flush=True)
    base = run_child([sys.executable, "-c", BASELINE], threads)["peak_rss_mb"]
    loaded = run_child([sys.executable, "-c", LOADED, info["model_dir"]],
                       threads)["peak_rss_mb"]
    measured = {}
    for col, spec in (("full", "full.toml"), ("spec", "lora.toml")):
        print(f"[bench] memory: peftspec train {spec} ({s.mem_steps} steps) ...",
              file=sys.stderr, flush=True)
        r = peftspec_train(work, info, s, spec, s.mem_steps, f"mem-{col}", threads)
        measured[col] = {"reported_peak_rss_mb": r["summary"]["peak_rss_mb"],
                         "child_ru_maxrss_mb": r["peak_rss_mb"],
                         "median_tokens_per_s": statistics.median(r["step_tokens_per_s"][1:]
                                                                  or r["step_tokens_per_s"]),
                         "losses": r["losses"]}
        print(f"[bench] memory: peftspec train {spec} ({s.mem_steps} steps), "
              f"MALLOC_MMAP_THRESHOLD_={TRIM_ENV['MALLOC_MMAP_THRESHOLD_']} ...",
              file=sys.stderr, flush=True)
        r = peftspec_train(work, info, s, spec, s.mem_steps, f"mem-{col}-trim", threads,
                           env_extra=TRIM_ENV)
        measured[col]["trimmed_peak_rss_mb"] = r["summary"]["peak_rss_mb"]
    return {"estimate": est, "measured": measured, "baseline_import_mb": base,
            "baseline_loaded_mb": loaded, "steps": s.mem_steps}


# ---------------------------------------------------------------- report
def _env(threads: int) -> dict:
    """Versions from package metadata: the parent imports no torch (see :func:`setup`)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": ver("torch"),
            "transformers": ver("transformers"), "peft": ver("peft"),
            "peftspec": ver("peftspec"), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "threads": threads, "loadavg_start": loadavg()}


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MB"


def throughput_table(res: dict, s: Settings, info: dict) -> str:
    t = res["throughput"]
    m, w = t["median_tokens_per_s"], t["wall_median_tokens_per_s"]
    p, h = t["peak_rss_mb"], t["steps_kept"]
    name = "GPT-2 small" if s.gpt2 is None else f"GPT-2 {info['layers']}L (quick)"
    rr = ", ".join(f"{x:.3f}" for x in t["round_ratios"])
    rows = [f"Training throughput, LoRA r=16 on {name}, batch {s.batch}x{s.seq}, "
            f"{s.rounds} round(s) x {s.steps} steps, first {s.drop} of each run dropped; "
            f"progress bar drawn on a pseudo-terminal: "
            f"{'yes' if t['progress_bar_drawn'] else '**no**'}",
            "",
            "| | peftspec train | plain loop over HF PEFT | peftspec / HF | goal | met |",
            "|---|---|---|---|---|---|",
            f"| tokens/s, median of {h['peftspec']} / {h['hf']} steps | {m['peftspec']:,.1f} | "
            f"{m['hf']:,.1f} | {t['ratio']:.3f}x | >= 1.0x | "
            f"{'yes' if t['ratio'] >= 1.0 else '**no**'} |",
            f"| cross-check: per-round ratios | | | {rr} | | |",
            f"| cross-check: fastest step | | | {t['best_ratio']:.3f}x | | |",
            f"| cross-check: tokens per CPU-second, median | "
            f"{t['cpu_median_tokens_per_s']['peftspec']:,.1f} | "
            f"{t['cpu_median_tokens_per_s']['hf']:,.1f} | {t['cpu_ratio']:.3f}x | | |",
            f"| tokens/s step to step (peftspec: log, progress bar included) | "
            f"{w['peftspec']:,.1f} | {w['hf']:,.1f} | {t['wall_ratio']:.3f}x | | |",
            f"| peak RSS of the process (ru_maxrss), median | {p['peftspec']:,.0f} MB | "
            f"{p['hf']:,.0f} MB | {p['peftspec'] / p['hf']:.3f} | | |"]
    return "\n".join(rows)


def memory_table(res: dict, s: Settings, info: dict) -> str:
    mem = res["memory"]
    cols = mem["estimate"]["columns"]
    meas = mem["measured"]
    name = "GPT-2 small" if s.gpt2 is None else f"GPT-2 {info['layers']}L (quick)"
    rows = [f"Training memory, {name}, batch {s.batch}x{s.seq}, fp32, AdamW "
            f"(`peftspec memory` estimate; measured: `peftspec train`, {mem['steps']} steps)",
            "",
            "| | full fine-tuning | LoRA r=16 |", "|---|---|---|",
            f"| trainable parameters | {cols['full']['trainable']:,} | "
            f"{cols['spec']['trainable']:,} |"]
    for key, label in (("weights", "weights"), ("gradients", "gradients"),
                       ("optimizer", "AdamW states"), ("activations", "activations (estimate)"),
                       ("total", "total (estimate)")):
        rows.append(f"| {label} | {_mb(cols['full'][key])} | {_mb(cols['spec'][key])} |")
    f, l = meas["full"]["reported_peak_rss_mb"], meas["spec"]["reported_peak_rss_mb"]
    b = mem["baseline_import_mb"]
    rows.append(f"| measured peak RSS (`peftspec train`) | {f:,.0f} MB | {l:,.0f} MB |")
    rows.append(f"| measured peak minus interpreter baseline | {f - b:,.0f} MB | "
                f"{l - b:,.0f} MB |")
    ft, lt = meas["full"]["trimmed_peak_rss_mb"], meas["spec"]["trimmed_peak_rss_mb"]
    rows.append(f"| measured peak RSS, freed blocks returned at once "
                f"(`MALLOC_MMAP_THRESHOLD_={TRIM_ENV['MALLOC_MMAP_THRESHOLD_']}`) | "
                f"{ft:,.0f} MB | {lt:,.0f} MB |")
    rows += ["", f"Interpreter baseline (`python -c \"{BASELINE}\"`): {b:,.0f} MB; "
             f"with the model loaded (`peftspec.load_model('hf:DIR')`): "
             f"{mem['baseline_loaded_mb']:,.0f} MB. MB = 2^20 bytes."]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["throughput", "memory"], action="append",
                    help="run only this part (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a tiny GPT-2, one round (smoke test)")
    ap.add_argument("--rounds", type=int, help="throughput rounds (peftspec/HF pairs)")
    ap.add_argument("--steps", type=int, help="optimizer steps per throughput run")
    ap.add_argument("--drop", type=int, help="warm-up steps dropped from each run")
    ap.add_argument("--mem-steps", type=int, help="optimizer steps per memory run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--workdir", type=Path,
                    help="build the model and data here and keep them (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--hf-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--setup-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    s = QUICK if args.quick else Settings()
    if args.setup_child:
        print(json.dumps(setup(args.setup_child, s)))
        return 0
    if args.hf_child:
        print(json.dumps(hf_child(args.hf_child, s, args.steps or s.steps, args.threads)))
        return 0
    over = {k: v for k, v in (("rounds", args.rounds), ("steps", args.steps),
                              ("drop", args.drop), ("mem_steps", args.mem_steps))
            if v is not None}
    if over:
        s = Settings(**{**asdict(s), **over})
    if s.steps <= s.drop:
        ap.error(f"--steps ({s.steps}) must be more than the dropped warm-up steps ({s.drop})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    parts = args.only or ["throughput", "memory"]
    res: dict = {"env": _env(args.threads), "quick": args.quick, "settings": asdict(s)}
    t0 = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="peftspec-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"[bench] building the model, tokenizer and data in {work} ...", file=sys.stderr,
              flush=True)
        info = res["setup"] = setup_in_subprocess(work, s, args.threads)
        for part in ("throughput", "memory"):
            if part not in parts:
                continue
            t = time.perf_counter()
            fn = bench_throughput if part == "throughput" else bench_memory
            res[part] = fn(work, info, s, args.threads)
            res[part]["wall_s"] = time.perf_counter() - t
            print(f"[bench] {part} done in {res[part]['wall_s']:.0f} s", file=sys.stderr,
                  flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    res["env"]["loadavg_end"] = loadavg()
    res["total_s"] = time.perf_counter() - t0

    print(header(res["env"], args.quick, res["total_s"]))
    if "throughput" in res:
        print()
        print(throughput_table(res, s, info))
    if "memory" in res:
        print()
        print(memory_table(res, s, info))
    if args.json:
        print()
        print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
