"""What the framework's value checks cost at apply (issue 27, point 2).

``apply_plan`` takes every base tensor's version counter once before the first
step and compares them once after the last (``core.valueguard.ValueGuard``). For
a method that is not peftspec's own it holds a write barrier around that
method's ``apply`` (a ``TorchFunctionMode`` refusing torch's in-place writes into
the base, ``core.barrier``, and sampling a few bytes of a base tensor whose
memory leaves torch). This times ``peftspec.apply`` in four variants, rounds
rotated:

* ``neither``: the checks replaced by a no-op;
* ``built-in``: peftspec's own LoRA, as a user runs it (version counters);
* ``third-party``: the same LoRA registered by another distribution
  (``bench-third-party``): counters and the barrier;
* ``third-party, no barrier``: the counters alone, for the barrier's share;

on:

* the 512-layer tiny Llama of ``bench_core`` (LoRA r=8 on its 3,584 linears);
* SmolLM2-135M-Instruct (``--model smollm2``), LoRA r=16 on all seven
  projections of its 30 layers (210 targets).

Prints medians and the overheads against neither; goal: within 10% of apply time.
Also timed directly: the counters, and the counters with every tensor's bytes
sampled up front (what an ``after_apply`` hook, which runs outside any barrier,
costs).
Run ``python bench/bench_value_guard.py [--rounds N] [--skip-smollm2]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import types

import torch

import peftspec
import peftspec.core.patching as patching
from peftspec.core.valueguard import ValueGuard
from peftspec_plugins.lora import LoRA

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class NoGuard:
    def __init__(self, snap, exempt=(), sample=False):
        pass

    def check(self, registry, plan, failed=None):
        pass

    def barrier(self):
        return None

    def raise_refused(self, registry, step, barrier, cause=None):
        pass


class NoBarrier(ValueGuard):
    """The counters alone, without the barrier."""
    __slots__ = ()

    def barrier(self):
        return None


class ThirdPartyLoRA(LoRA):
    """peftspec's LoRA under another name, as a third party would ship it."""
    name = "lora-third-party"


def third_party_registry():
    mod = types.ModuleType("bench_third_party")

    @peftspec.hookimpl
    def register_methods(register):
        register(ThirdPartyLoRA())

    mod.register_methods = register_methods
    mod.__peftspec_dist__ = "bench-third-party"
    return peftspec.build_registry(plugins=[mod])


def tiny_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, num_hidden_layers=layers)
    return LlamaForCausalLM(cfg)


def time_apply(make, spec_text: str, rounds: int) -> dict:
    reg = third_party_registry()
    variants = {"neither": (NoGuard, "lora"), "built-in": (ValueGuard, "lora"),
                "third-party": (ValueGuard, ThirdPartyLoRA.name),
                "third-party, no barrier": (NoBarrier, ThirdPartyLoRA.name)}
    specs = {m: peftspec.parse_spec(spec_text.format(method=m), registry=reg)
             for m in ("lora", ThirdPartyLoRA.name)}
    names = list(variants)
    times = {k: [] for k in names}
    for m in specs:  # warm-up
        peftspec.apply(specs[m], make(), registry=reg)
    for i in range(rounds):
        for variant in names[i % len(names):] + names[:i % len(names)]:  # rotated
            guard, method = variants[variant]
            patching.ValueGuard = guard
            torch.manual_seed(i)
            model = make()
            gc.collect()
            t0 = time.perf_counter()
            peftspec.apply(specs[method], model, registry=reg)
            times[variant].append(time.perf_counter() - t0)
            del model
    patching.ValueGuard = ValueGuard
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "direct_s": time_guard(make(), specs["lora"], reg),
            "overhead": {k: med[k] / med["neither"] - 1 for k in names[1:]},
            "min_overhead": {k: min(times[k]) / min(times["neither"]) - 1 for k in names[1:]},
            "times_s": times}


def time_guard(model, spec, reg, repeats: int = 21) -> dict:
    """The guard's own work, timed directly (what the rounds above measure
    through noise): taking the counters (and bytes) of every base tensor and
    comparing them once, medians of ``repeats``."""
    from peftspec.core.fingerprint import named_tensors
    from peftspec.core.promise import BaseSnapshot

    plan = peftspec.compile_plan(spec, model, registry=reg)
    snap = BaseSnapshot(*named_tensors(model))
    out = {}
    for sample in (False, True):
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ValueGuard(snap, (), sample).check(reg, plan)
            t.append(time.perf_counter() - t0)
        out["counters and bytes" if sample else "counters"] = statistics.median(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=512)
    ap.add_argument("--skip-smollm2", action="store_true")
    a = ap.parse_args()
    res = {}
    spec = ('[[reparameterize]]\nmethod = "{method}"\nmodules = ["type:Linear"]\n'
            'exclude = ["lm_head"]\nr = 8\nalpha = 8.0\n')
    res["tiny_llama"] = time_apply(lambda: tiny_llama(a.layers), spec, a.rounds)
    if not a.skip_smollm2:
        reg = peftspec.get_registry()
        base = reg.load_model("smollm2")
        import copy
        spec = ('[[reparameterize]]\nmethod = "{method}"\nmodules = '
                + json.dumps([f"**.{n}" for n in LINEARS]) + "\nr = 16\n")
        res["smollm2"] = time_apply(lambda: copy.deepcopy(base), spec, a.rounds)
    for name, r in res.items():
        m = r["median_s"]
        o, lo = r["overhead"], r["min_overhead"]
        print(f"{name}: apply {m['neither'] * 1e3:.1f} ms with neither check; peftspec's "
              f"LoRA {m['built-in'] * 1e3:.1f} ms ({o['built-in']:+.1%}, fastest rounds "
              f"{lo['built-in']:+.1%}); as a third party's {m['third-party'] * 1e3:.1f} ms "
              f"({o['third-party']:+.1%}, fastest {lo['third-party']:+.1%}); without the "
              f"barrier (the counters) {m['third-party, no barrier'] * 1e3:.1f}"
              f" ms ({o['third-party, no barrier']:+.1%})")
        d = r["direct_s"]
        print(f"  timed directly: the counters {d['counters'] * 1e3:.2f} ms "
              f"({d['counters'] / m['neither']:.1%} of apply), with every tensor's bytes "
              f"{d['counters and bytes'] * 1e3:.2f} ms "
              f"({d['counters and bytes'] / m['neither']:.1%})")
    print(json.dumps({k: {kk: v[kk] for kk in ("median_s", "overhead", "min_overhead",
                                               "direct_s")} for k, v in res.items()}))


if __name__ == "__main__":
    main()
