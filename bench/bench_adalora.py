"""AdaLoRA against HF PEFT's, same run, on the CPU: apply time and forward overhead.

* **apply**: AdaLoRA init_r = 12 on every linear layer of the 512-layer tiny Llama
  of ``bench_core`` (3,584 targets): ``peftspec.apply`` against
  ``get_peft_model(AdaLoraConfig(...))``, fresh model each, interleaved, median.
* **forward**: AdaLoRA init_r = 12 on GPT-2 small's ``c_attn``, ``c_proj``,
  ``c_fc``, batch 4x256, eval, no grad: each variant's time over the plain
  model's, base and both variants interleaved, median of per-round ratios (the
  triplets are given random non-zero values, the same in both).

``python bench/bench_adalora.py`` (``--quick``: small models, seconds; ``--json``).
Figures measured on a loaded machine are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from peft import AdaLoraConfig, get_peft_model  # noqa: E402

import peftspec  # noqa: E402
from bench_core import (GPT2_TARGETS, LLAMA_LINEARS, QUICK, Settings, _batch, _gpt2,  # noqa: E402
                        _rotated, _seed, _timed, _tiny_llama, sharing_copy)


def _spec(targets):
    return peftspec.parse_spec('[[reparameterize]]\nmethod = "adalora"\n'
                               f"modules = {json.dumps(['**.' + t for t in targets])}\n"
                               "init_r = 12\ntarget_r = 8\n")


def _hf(model, targets, conv1d=False):
    return get_peft_model(model, AdaLoraConfig(init_r=12, target_r=8, total_step=100,
                                               target_modules=targets, fan_in_fan_out=conv1d))


def bench_apply(s: Settings) -> dict:
    peftspec.apply(_spec(LLAMA_LINEARS), _tiny_llama(2))  # warm-up
    _hf(_tiny_llama(2), LLAMA_LINEARS)
    times = {"peftspec": [], "hf": []}
    for i in range(s.apply_rounds):
        for variant in (["hf", "peftspec"] if i % 2 == 0 else ["peftspec", "hf"]):
            _seed(i)
            model = _tiny_llama(s.llama_layers)
            if variant == "peftspec":
                times[variant].append(_timed(lambda: peftspec.apply(_spec(LLAMA_LINEARS),
                                                                    model)))
            else:
                times[variant].append(_timed(lambda: _hf(model, LLAMA_LINEARS)))
            del model
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"targets": s.llama_layers * len(LLAMA_LINEARS), "median_s": med,
            "ratio": med["peftspec"] / med["hf"]}


def bench_forward(s: Settings) -> dict:
    base = _gpt2(s).eval()
    ours = peftspec.apply(_spec(GPT2_TARGETS), sharing_copy(base)).eval()
    hf = _hf(sharing_copy(base), GPT2_TARGETS, conv1d=True).eval()
    gen = torch.Generator().manual_seed(0)
    mine = peftspec.adapter_params(ours)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.requires_grad:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
                mine[name.removeprefix("base_model.model.").replace(".default", "")].copy_(p)
    models = {"base": base, "peftspec": ours, "hf": hf}
    x = _batch(s)
    ratios = {"peftspec": [], "hf": []}
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, hf(x).logits, atol=1e-4)
        for i in range(s.forward_rounds):
            this = {k: _timed(lambda: models[k](x)) for k in _rotated(list(models), i)}
            for k in ratios:
                ratios[k].append(this[k] / this["base"])
    return {"shape": [s.batch, s.seq], "ratio_to_base": {k: statistics.median(v)
                                                         for k, v in ratios.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else Settings()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    res = {"apply": bench_apply(s), "forward": bench_forward(s),
           "loadavg": open("/proc/loadavg").read().split()[:3]
           if os.path.exists("/proc/loadavg") else None}
    a, f = res["apply"], res["forward"]
    print(f"AdaLoRA apply, {a['targets']:,} targets: peftspec {a['median_s']['peftspec']:.3f} s, "
          f"HF PEFT {a['median_s']['hf']:.3f} s, ratio {a['ratio']:.3f} (goal <= 0.1)")
    print(f"AdaLoRA forward {f['shape']}: peftspec {f['ratio_to_base']['peftspec']:.3f}x base, "
          f"HF PEFT {f['ratio_to_base']['hf']:.3f}x base (goal: peftspec <= HF)")
    print(f"load average: {' '.join(res['loadavg'] or ['n/a'])}")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
