"""Per-row adapters: throughput with 8 different LoRA adapters in one batch against
the same batch on one adapter, peftspec beside HF PEFT's ``adapter_names``.

GPT-2 small (random weights, built from its config; nothing is downloaded), LoRA
r=16 on c_attn, c_proj and c_fc, batch 8x128, eval mode, no grad. For each
library: ratio = (time of the batch on one adapter) / (time of the same batch with
a different adapter per row), so 1.0x means mixing adapters costs nothing and
higher is better. Variants are interleaved, medians of the per-round times.

Run: python bench/bench_rows.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import transformers  # noqa: E402

import peftspec  # noqa: E402

N_ADAPTERS = 8


def build(quick: bool):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config() if not quick else transformers.GPT2Config(
        n_layer=2, n_embd=128, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def timed(fn, warmup=1):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, for a smoke test")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = build(args.quick)
    seq = 32 if args.quick else 128
    ids = torch.randint(0, base.config.vocab_size, (N_ADAPTERS, seq))
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    spec = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\n'
                               'modules = ["**.c_attn", "**.c_proj", "**.c_fc"]\nr = 16\n'
                               'alpha = 32\n')

    ours = copy.deepcopy(base)
    for i, name in enumerate(names):
        torch.manual_seed(i)
        plan = peftspec.compile_plan(spec, ours)
        peftspec.apply_plan(plan, ours, name=name)
    peftspec.use(ours, names[0])

    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"],
                          fan_in_fan_out=True)
    hf = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        hf.add_adapter(name, cfg)
    hf.set_adapter(names[0])
    hf.eval()

    def ours_single():
        ours(ids)

    def ours_mixed():
        with peftspec.rows(ours, names):
            ours(ids)

    def hf_single():
        hf(input_ids=ids)

    def hf_mixed():
        hf(input_ids=ids, adapter_names=names)

    times = {k: [] for k in ("ours_single", "ours_mixed", "hf_single", "hf_mixed")}
    fns = {"ours_single": ours_single, "ours_mixed": ours_mixed, "hf_single": hf_single,
           "hf_mixed": hf_mixed}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for key, fn in fns.items():
                times[key].append(timed(fn, warmup=0))
    med = {k: statistics.median(v) for k, v in times.items()}
    ours_ratio = med["ours_single"] / med["ours_mixed"]
    hf_ratio = med["hf_single"] / med["hf_mixed"]
    tokens = ids.numel()
    print(f"# per-row adapters: GPT-2{' (quick)' if args.quick else ' small'}, "
          f"{N_ADAPTERS}x{seq}, LoRA r=16, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds}")
    print("| | one adapter (tok/s) | 8 adapters, one per row (tok/s) | ratio |")
    print("|---|---|---|---|")
    print(f"| peftspec `rows` | {tokens / med['ours_single']:,.0f} | "
          f"{tokens / med['ours_mixed']:,.0f} | {ours_ratio:.3f}x |")
    print(f"| HF PEFT `adapter_names` | {tokens / med['hf_single']:,.0f} | "
          f"{tokens / med['hf_mixed']:,.0f} | {hf_ratio:.3f}x |")
    print(f"goal: peftspec ratio >= 0.95x and >= HF PEFT's: "
          f"{'met' if ours_ratio >= 0.95 and ours_ratio >= hf_ratio else 'NOT met'}")


if __name__ == "__main__":
    main()
