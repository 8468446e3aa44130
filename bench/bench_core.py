"""Core benchmarks: peftspec against HF PEFT, side by side, in one run, on the CPU.

Three measurements (see bench/README.md for how to read them):

1. **apply**: LoRA r=8 on every linear layer of a 512-layer tiny Llama (7 per
   layer, 3,584 targets; ``lm_head`` excluded): ``peftspec.apply(spec, model)``
   against ``peft.get_peft_model(model, LoraConfig(...))``, each on a fresh
   model, median of a few interleaved repeats. Goal: peftspec <= 1/20 of HF.
2. **forward**: unmerged LoRA r=16 on GPT-2 small (``c_attn``, ``c_proj``,
   ``c_fc``), batch 4x256, eval mode, ``torch.no_grad``: each variant's
   forward time over the plain model's, base and both variants interleaved,
   median of the per-round ratios. Goal: peftspec <= 1.05x.
3. **train**: one LoRA r=16 step on GPT-2 small, batch 4x256 (forward, causal-LM
   loss, backward, AdamW step): time against HF (goal <= 1.0x), and peak
   memory, each variant in its own subprocess (the script re-invokes itself),
   as peak RSS growth over the RSS before the adapter is applied (goal <= HF).

Models are built from configs in code with random weights (nothing is
downloaded); zero-initialised ``lora_B`` does not change the cost of a step.

Run ``python bench/bench_core.py`` (a few minutes), ``--only forward`` for one
part, ``--quick`` for a smoke test (small models, seconds), ``--json`` for a
machine-readable result after the table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import peftspec  # noqa: E402
from benchenv import cpu_name, header, loadavg  # noqa: E402
from peftspec.train.memory import peak_rss_mb  # noqa: E402

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


@dataclass(frozen=True)
class Settings:
    llama_layers: int = 512
    apply_rounds: int = 3          # HF and peftspec interleaved, fresh model each
    apply_extra_peftspec: int = 2  # peftspec is cheap: a few more repeats for its median
    gpt2_layers: int = 12
    batch: int = 4
    seq: int = 256
    forward_rounds: int = 7
    train_rounds: int = 5
    mem_steps: int = 2             # steps per memory subprocess (AdamW state exists from step 1)


QUICK = Settings(llama_layers=32, apply_rounds=1, apply_extra_peftspec=1, gpt2_layers=2,
                 batch=2, seq=64, forward_rounds=2, train_rounds=1, mem_steps=1)


# ---------------------------------------------------------------- helpers
def _seed(n: int = 0) -> None:
    torch.manual_seed(n)


def _timed(fn, cpu: list | None = None) -> float:
    """Wall seconds of ``fn()``; its process CPU seconds are appended to ``cpu``."""
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return wall


def _lora_spec(modules: list[str], r: int, alpha: float, exclude: list[str] = ()) -> peftspec.Spec:
    lines = ["[[reparameterize]]", 'method = "lora"', f"modules = {json.dumps(modules)}",
             f"r = {r}", f"alpha = {float(alpha)}"]
    if exclude:
        lines.append(f"exclude = {json.dumps(list(exclude))}")
    return peftspec.parse_spec("\n".join(lines) + "\n")


def _hf_lora(model, r: int, alpha: float, targets: list[str], conv1d: bool = False):
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                     fan_in_fan_out=conv1d)
    return get_peft_model(model, cfg)


def _count_hf_lora_layers(model) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def _tiny_llama(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, num_hidden_layers=layers)
    return LlamaForCausalLM(cfg)


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that holds the very same parameters and buffers.

    The plain model and its adapted copies then read one set of base weights: with
    a copy each, where each copy's weights landed (``lm_head`` alone is 154 MB)
    moved the whole-model ratio by several percent between runs, more than a method
    costs. Neither method writes the base weights (the benches compare outputs with the
    plain model's)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _gpt2(s: Settings) -> GPT2LMHeadModel:
    _seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=s.gpt2_layers))


def _gpt2_variants(s: Settings, which: str) -> dict[str, torch.nn.Module]:
    """The plain model and its LoRA r=16 twins (peftspec, HF), sharing its base
    tensors (:func:`sharing_copy`)."""
    base = _gpt2(s)
    out = {}
    if "base" in which:
        out["base"] = base
    if "peftspec" in which:
        spec = _lora_spec([f"**.{t}" for t in GPT2_TARGETS], r=16, alpha=32)
        out["peftspec"] = peftspec.apply(spec, sharing_copy(base))
    if "hf" in which:
        out["hf"] = _hf_lora(sharing_copy(base), 16, 32, GPT2_TARGETS, conv1d=True)
    return out


def _batch(s: Settings) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, GPT2Config().vocab_size, (s.batch, s.seq), generator=g)


def _rotated(items: list, k: int) -> list:
    k %= len(items)
    return items[k:] + items[:k]


def _fmt_s(t: float) -> str:
    return f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s"


# ---------------------------------------------------------------- 1. apply
def bench_apply(s: Settings) -> dict:
    n_targets = s.llama_layers * len(LLAMA_LINEARS)
    by_type = _lora_spec(["type:Linear"], r=8, alpha=8, exclude=["lm_head"])
    by_glob = _lora_spec([f"**.{n}" for n in LLAMA_LINEARS], r=8, alpha=8)

    # Both spellings must pick the same 7-per-layer targets.
    _seed(0)
    model = _tiny_llama(s.llama_layers)
    t_type = [st.target for st in peftspec.compile_plan(by_type, model).steps]
    t_glob = [st.target for st in peftspec.compile_plan(by_glob, model).steps]
    assert t_type == t_glob and len(t_type) == n_targets, (len(t_type), len(t_glob), n_targets)
    del model

    # Warm-up: imports, registries and first-call costs on a small model.
    peftspec.apply(by_type, _tiny_llama(2))
    _hf_lora(_tiny_llama(2), 8, 8, LLAMA_LINEARS)

    times = {"peftspec": [], "hf": []}
    cpu = {"peftspec": [], "hf": []}
    for i in range(s.apply_rounds + s.apply_extra_peftspec):
        order = ["hf", "peftspec"] if i % 2 == 0 else ["peftspec", "hf"]
        for variant in order:
            if variant == "hf" and i >= s.apply_rounds:
                continue
            _seed(i)
            model = _tiny_llama(s.llama_layers)
            if variant == "peftspec":
                times[variant].append(_timed(lambda: peftspec.apply(by_type, model),
                                             cpu[variant]))
                assert len(peftspec.adapter_params(model)) == 2 * n_targets  # lora_A, lora_B
            else:
                box = []
                times[variant].append(_timed(lambda: box.append(
                    _hf_lora(model, 8, 8, LLAMA_LINEARS)), cpu[variant]))
                assert _count_hf_lora_layers(box[0]) == n_targets
                del box
            del model
            gc.collect()
    med = {k: statistics.median(v) for k, v in times.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    return {"targets": n_targets, "layers": s.llama_layers, "times_s": times,
            "median_s": med, "ratio": med["peftspec"] / med["hf"],
            "cpu_s": cpu, "cpu_ratio": cmed["peftspec"] / cmed["hf"],
            "min_ratio": min(times["peftspec"]) / min(times["hf"])}


# ---------------------------------------------------------------- 2. forward
def bench_forward(s: Settings) -> dict:
    models = {k: m.eval() for k, m in _gpt2_variants(s, "base peftspec hf").items()}
    x = _batch(s)
    with torch.no_grad():
        ref = models["base"](x).logits
        # zero-init B: peftspec must leave the outputs bit-identical
        assert torch.equal(models["peftspec"](x).logits, ref), "peftspec changed the outputs"
        assert torch.allclose(models["hf"](x).logits, ref, atol=1e-5)
        del ref
        names = list(models)
        times = {k: [] for k in names}
        cpu = {k: [] for k in names}
        ratios = {"peftspec": [], "hf": []}
        for i in range(s.forward_rounds):
            this = {}
            for k in _rotated(names, i):
                this[k] = _timed(lambda: models[k](x), cpu[k])
                times[k].append(this[k])
            for k in ratios:
                ratios[k].append(this[k] / this["base"])
    return {"shape": [s.batch, s.seq], "layers": s.gpt2_layers, "times_s": times,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio_to_base": {k: statistics.median(v) for k, v in ratios.items()},
            "round_ratios": ratios,
            # less sensitive to other load: the fastest round of each, and CPU time
            "min_ratio_to_base": {k: min(times[k]) / min(times["base"]) for k in ratios},
            "cpu_s": cpu,
            "cpu_ratio_to_base": {k: statistics.median(cpu[k]) / statistics.median(cpu["base"])
                                  for k in ratios}}


# ---------------------------------------------------------------- 3. train
def _trainer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


def bench_train(s: Settings, threads: int) -> dict:
    models = {k: m.train() for k, m in _gpt2_variants(s, "peftspec hf").items()}
    x = _batch(s)
    steps, trainable = {}, {}
    for k, m in models.items():
        steps[k], trainable[k] = _trainer(m)
    assert trainable["peftspec"] == trainable["hf"], trainable
    for k in models:  # warm-up (also creates AdamW's state)
        steps[k](x)
    times = {k: [] for k in models}
    cpu = {k: [] for k in models}
    ratios = []
    for i in range(s.train_rounds):
        this = {}
        for k in _rotated(list(models), i):
            this[k] = _timed(lambda: steps[k](x), cpu[k])
            times[k].append(this[k])
        ratios.append(this["peftspec"] / this["hf"])
    del models, steps
    gc.collect()
    mem = {k: _memory_in_subprocess(k, s, threads) for k in ("peftspec", "hf")}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": [s.batch, s.seq], "layers": s.gpt2_layers, "trainable_params": trainable,
            "times_s": times, "median_s": med, "ratio": statistics.median(ratios),
            "round_ratios": ratios, "min_ratio": min(times["peftspec"]) / min(times["hf"]),
            "cpu_s": cpu, "cpu_ratio": statistics.median(cpu["peftspec"]) /
            statistics.median(cpu["hf"]), "peak_rss_growth_mb": {k: v["growth_mb"] for k, v in mem.items()},
            "memory": mem}


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(variant: str, s: Settings) -> dict:
    """In a fresh process: peak RSS growth of applying ``variant`` and training."""
    base = _gpt2(s).train()
    x = _batch(s)
    gc.collect()
    rss0 = _rss_now_mb()
    reset = _reset_peak()
    if variant == "peftspec":
        model = peftspec.apply(_lora_spec([f"**.{t}" for t in GPT2_TARGETS], 16, 32), base)
    else:
        model = _hf_lora(base, 16, 32, GPT2_TARGETS, conv1d=True)
    step, _ = _trainer(model.train())
    for _ in range(s.mem_steps):
        step(x)
    peak = peak_rss_mb()
    return {"rss_before_mb": rss0, "peak_mb": peak, "growth_mb": peak - rss0,
            "peak_reset": reset}


def _memory_in_subprocess(variant: str, s: Settings, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", variant,
           "--threads", str(threads)] + (["--quick"] if s is QUICK else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report
def _env(threads: int) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "peftspec": peftspec.__version__, "cpu": cpu_name(), "cpus": os.cpu_count(),
            "threads": threads, "loadavg_start": loadavg()}


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(res: dict) -> str:
    """The markdown table. 'peftspec / HF' and 'met' use medians (of paired
    per-round ratios where rounds interleave); the cross-check column gives the
    same ratio from the fastest round of each variant and from median process
    CPU time, both less disturbed by other load on the machine."""
    rows = ["| benchmark | peftspec | HF PEFT | peftspec / HF | cross-check: fastest / CPU "
            "| goal | met |", "|---|---|---|---|---|---|---|"]
    if "apply" in res:
        a = res["apply"]
        m = a["median_s"]
        rows.append(
            f"| apply LoRA r=8 to {a['targets']:,} Linear ({a['layers']}-layer tiny Llama), "
            f"median of {len(a['times_s']['hf'])}/{len(a['times_s']['peftspec'])} | "
            f"{_fmt_s(m['peftspec'])} | {_fmt_s(m['hf'])} | {a['ratio']:.3f} "
            f"(1/{1 / a['ratio']:.0f}) | {a['min_ratio']:.3f} / {a['cpu_ratio']:.3f} | "
            f"<= 0.05 (1/20) | {_yes(a['ratio'] <= 0.05)} |")
    if "forward" in res:
        f = res["forward"]
        r, m = f["ratio_to_base"], f["median_s"]
        mn, c = f["min_ratio_to_base"], f["cpu_ratio_to_base"]
        b, t = f["shape"]
        rows.append(
            f"| forward time / plain model's, unmerged LoRA r=16, GPT-2 {f['layers']}L {b}x{t}, "
            f"eval, no_grad (plain: {_fmt_s(m['base'])}), median of "
            f"{len(f['round_ratios']['hf'])} rounds | {r['peftspec']:.3f}x | {r['hf']:.3f}x | "
            f"{r['peftspec'] / r['hf']:.3f} | {mn['peftspec']:.3f}x vs {mn['hf']:.3f}x / "
            f"{c['peftspec']:.3f}x vs {c['hf']:.3f}x | peftspec <= 1.05x | "
            f"{_yes(r['peftspec'] <= 1.05)} |")
    if "train" in res:
        t = res["train"]
        m, g = t["median_s"], t["peak_rss_growth_mb"]
        b, n = t["shape"]
        rows.append(
            f"| train step (fwd + bwd + AdamW), LoRA r=16, GPT-2 {t['layers']}L {b}x{n}, "
            f"median of {len(t['round_ratios'])} | {_fmt_s(m['peftspec'])} | {_fmt_s(m['hf'])} | "
            f"{t['ratio']:.3f} | {t['min_ratio']:.3f} / {t['cpu_ratio']:.3f} | <= 1.0 | "
            f"{_yes(t['ratio'] <= 1.0)} |")
        gr = g["peftspec"] / g["hf"]
        rows.append(
            f"| train peak RSS growth over RSS before apply (own process, "
            f"{t['memory']['hf']['steps']} step(s)) | {g['peftspec']:.0f} MB | {g['hf']:.0f} MB | "
            f"{gr:.3f} | | <= 1.0 | {_yes(gr <= 1.0)} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["apply", "forward", "train"], action="append",
                    help="run only this part (repeatable)")
    ap.add_argument("--quick", action="store_true", help="small models, few repeats (smoke test)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--memory-child", choices=["peftspec", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    if args.memory_child:
        res = memory_child(args.memory_child, s)
        res["steps"] = s.mem_steps
        print(json.dumps(res))
        return 0

    parts = args.only or ["apply", "forward", "train"]
    res: dict = {"env": _env(args.threads), "quick": args.quick}
    t0 = time.perf_counter()
    for part in ("apply", "forward", "train"):
        if part not in parts:
            continue
        t = time.perf_counter()
        print(f"[bench] {part} ...", file=sys.stderr, flush=True)
        if part == "apply":
            res[part] = bench_apply(s)
        elif part == "forward":
            res[part] = bench_forward(s)
        else:
            res[part] = bench_train(s, args.threads)
        res[part]["wall_s"] = time.perf_counter() - t
        print(f"[bench] {part} done in {res[part]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    res["env"]["loadavg_end"] = loadavg()
    res["total_s"] = time.perf_counter() - t0

    print(header(res["env"], args.quick))
    print()
    print(table(res))
    if args.json:
        print()
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
