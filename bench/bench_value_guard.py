"""What the framework's value checks cost at apply (issue 27, point 2).

Around each step's ``Method.apply``, ``apply_plan`` holds a write barrier (a
``TorchFunctionMode`` refusing torch's in-place writes into the step's base
tensors: ``core.barrier``) and, after it, compares each base tensor's version
counter and a few sampled bytes (``core.promise.ValueGuard``). This times
``peftspec.apply`` with both, with the guard but no barrier, and with neither,
rounds interleaved, on:

* the 512-layer tiny Llama of ``bench_core`` (LoRA r=8 on its 3,584 linears);
* SmolLM2-135M-Instruct (``--model smollm2``), LoRA r=16 on all seven
  projections of its 30 layers (210 targets).

Prints medians and the overheads against neither; goal: within 10% of apply time.
Run ``python bench/bench_value_guard.py [--rounds N] [--skip-smollm2]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

import peftspec
import peftspec.core.patching as patching
from peftspec.core.promise import ValueGuard

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class NoGuard:
    def __init__(self, module, step, base_ids):
        pass

    def restore(self, which=None):
        pass

    def check(self, registry, step, **kw):
        pass

    def barrier(self):
        return None


class GuardOnly(ValueGuard):
    """The version counters and sampled bytes, without the barrier."""
    __slots__ = ()

    def barrier(self):
        return None


VARIANTS = {"both": ValueGuard, "guard only": GuardOnly, "neither": NoGuard}


def tiny_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, num_hidden_layers=layers)
    return LlamaForCausalLM(cfg)


def time_apply(make, spec, rounds: int) -> dict:
    names = list(VARIANTS)
    times = {k: [] for k in names}
    peftspec.apply(spec, make())  # warm-up
    for i in range(rounds):
        for variant in names[i % 3:] + names[:i % 3]:  # rotated round by round
            patching.ValueGuard = VARIANTS[variant]
            torch.manual_seed(i)
            model = make()
            gc.collect()
            t0 = time.perf_counter()
            peftspec.apply(spec, model)
            times[variant].append(time.perf_counter() - t0)
            del model
    patching.ValueGuard = ValueGuard
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med,
            "overhead": {k: med[k] / med["neither"] - 1 for k in names[:2]},
            "min_overhead": {k: min(times[k]) / min(times["neither"]) - 1 for k in names[:2]},
            "times_s": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=512)
    ap.add_argument("--skip-smollm2", action="store_true")
    a = ap.parse_args()
    res = {}
    spec = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\nmodules = ["type:Linear"]\n'
                               'exclude = ["lm_head"]\nr = 8\nalpha = 8.0\n')
    res["tiny_llama"] = time_apply(lambda: tiny_llama(a.layers), spec, a.rounds)
    if not a.skip_smollm2:
        reg = peftspec.get_registry()
        base = reg.load_model("smollm2")
        import copy
        spec = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\nmodules = '
                                   + json.dumps([f"**.{n}" for n in LINEARS]) + "\nr = 16\n")
        res["smollm2"] = time_apply(lambda: copy.deepcopy(base), spec, a.rounds)
    for name, r in res.items():
        m = r["median_s"]
        print(f"{name}: apply {m['neither'] * 1e3:.1f} ms with neither check; guard only "
              f"{m['guard only'] * 1e3:.1f} ms ({r['overhead']['guard only']:+.1%}); barrier "
              f"and guard {m['both'] * 1e3:.1f} ms ({r['overhead']['both']:+.1%}; fastest "
              f"rounds {r['min_overhead']['both']:+.1%})")
    print(json.dumps({k: {kk: v[kk] for kk in ("median_s", "overhead", "min_overhead")} for k, v in res.items()}))


if __name__ == "__main__":
    main()
