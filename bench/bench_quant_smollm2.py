"""QLoRA on SmolLM2-135M-Instruct (``--model smollm2``): quality and the two merges.

1. **Quality**: the quick start's LoRA (r=16 on all seven projections, the
   Brindlecombe data, ``specs/smollm2-lora.toml``'s training options) trained
   twice per seed, same steps, data and seed: on the float32 base, and with
   ``[[freeze]] nf4`` on all seven projections. Prints both held-out losses
   (``data/brindlecombe-heldout.jsonl``) and their ratio for each seed, then
   their geometric mean with a 95% interval (Student's t on the logs of the
   paired ratios; goal: within 5%). One seed is not enough: with the float32
   base alone, seeds 0-4 end at held-out losses 0.048-0.097, and the paired
   ratio ranged 0.87-1.33 over those seeds.
2. **Merge onto the original or the dequantized weights**: the nf4-trained
   adapter merged both ways (``peftspec.merge`` after ``load_adapter(...,
   freeze=True/False)``, then dense), and the logits of the held-out prompts
   compared: each merge against the unmerged QLoRA model (what was trained),
   and the two merges against each other (max and mean absolute difference,
   and how often the top-1 token differs).

``scaler_block_size = 64``: SmolLM2's k/v projections (192 x 576) have 1,728
blocks of 64 weights, which 256 does not divide (torchao's format needs it to).

Run ``python bench/bench_quant_smollm2.py`` (about 3 minutes a seed on 2 quiet
cores, 15 for the default five seeds); ``--seeds 0`` or ``--steps`` to shorten.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from benchenv import loadavg

REPO = Path(__file__).resolve().parent.parent
LORA = (REPO / "specs" / "smollm2-lora.toml").read_text()
FREEZE = """
[[freeze]]
method = "nf4"
modules = ["**.q_proj", "**.k_proj", "**.v_proj", "**.o_proj",
           "**.gate_proj", "**.up_proj", "**.down_proj"]
scaler_block_size = 64
"""


# Student's t, two-sided 95%, by degrees of freedom (1-10); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _ci95_of_ratio(ratios: list[float]) -> tuple[float, float] | None:
    """95% interval of the geometric mean of paired ratios: the mean of their logs
    +- t * standard error, exponentiated (``None`` for a single seed)."""
    n = len(ratios)
    if n < 2:
        return None
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    half = t * sd / math.sqrt(n)
    return math.exp(mean - half), math.exp(mean + half)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1,2,3,4",
                    help="comma-separated training seeds, one fp32/nf4 pair each "
                         "(the merge part uses the first seed's adapter)")
    args = ap.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds:
        ap.error("--seeds names no seed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import peftspec
    from peftspec.core.packed import thaw
    from peftspec.core.train_config import TrainConfig
    from peftspec.train.loop import train

    reg = peftspec.build_registry()
    spec_dir = REPO / "specs"
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="qlora-smollm2-"))
    t_all = time.perf_counter()
    per_seed = []
    for seed in seeds:
        results = {}
        for name, text in (("fp32", LORA), ("nf4", LORA + FREEZE)):
            spec = peftspec.parse_spec(text, file=str(spec_dir / f"smollm2-{name}.toml"))
            cfg = TrainConfig.resolve(**{**spec.train_config,
                                         "data": str(REPO / "data" / "brindlecombe-train.jsonl"),
                                         "eval": str(REPO / "data" / "brindlecombe-heldout.jsonl"),
                                         "steps": args.steps, "eval_every": 0, "seed": seed})
            t0 = time.perf_counter()
            out = tmp / (f"{name}.safetensors" if seed == seeds[0] else f"{name}-{seed}.safetensors")
            r = train(spec, cfg, model_source="smollm2", registry=reg, out=out)
            results[name] = {"eval_loss": r.eval_loss, "train_loss": r.train_loss,
                             "seconds": time.perf_counter() - t0, "peak_rss_mb": r.peak_rss_mb}
            print(f"... seed {seed}, trained {name}: held-out loss {r.eval_loss:.4f}",
                  file=sys.stderr)
        per_seed.append({"seed": seed, **results,
                         "nf4_over_fp32": results["nf4"]["eval_loss"] / results["fp32"]["eval_loss"]})
    ratios = [p["nf4_over_fp32"] for p in per_seed]
    mean_fp32 = sum(p["fp32"]["eval_loss"] for p in per_seed) / len(per_seed)
    mean_nf4 = sum(p["nf4"]["eval_loss"] for p in per_seed) / len(per_seed)

    # the held-out prompts, tokenized as generate does
    from transformers import AutoTokenizer

    from peftspec.models.hf import hf_folder

    folder = hf_folder("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompts = [json.loads(x)["prompt"] for x in
               (REPO / "data" / "brindlecombe-heldout.jsonl").read_text().splitlines() if x]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    adapter = tmp / "nf4.safetensors"

    def logits(model):
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        return out.logits[mask].float()

    qlora = reg.load_model("smollm2")
    peftspec.load_adapter(qlora, adapter, registry=reg)
    trained = logits(qlora)
    del qlora
    merged = {}
    for onto, freeze in (("original", False), ("dequantized", True)):
        m = reg.load_model("smollm2")
        peftspec.load_adapter(m, adapter, registry=reg, freeze=freeze)
        peftspec.merge(m)
        thaw(m)
        merged[onto] = logits(m)
        del m

    def diff(a, b):
        d = (a - b).abs()
        return {"max": float(d.max()), "mean": float(d.mean()),
                "top1_differs": float((a.argmax(-1) != b.argmax(-1)).float().mean())}

    report = {
        "steps": args.steps, "load_average": loadavg(),
        "quality": {"seeds": per_seed, "mean_ratio": sum(ratios) / len(ratios),
                    "geomean_ratio": math.prod(ratios) ** (1 / len(ratios)),
                    "geomean_ci95": _ci95_of_ratio(ratios),
                    "mean_fp32": mean_fp32, "mean_nf4": mean_nf4,
                    "ratio_of_means": mean_nf4 / mean_fp32},
        "merge": {"original_vs_trained": diff(merged["original"], trained),
                  "dequantized_vs_trained": diff(merged["dequantized"], trained),
                  "original_vs_dequantized": diff(merged["original"], merged["dequantized"]),
                  "tokens": int(batch["attention_mask"].sum())},
        "seconds": time.perf_counter() - t_all,
    }
    q = report["quality"]
    print(f"QLoRA on SmolLM2-135M-Instruct, {args.steps} steps, load {report['load_average']}")
    for p in q["seeds"]:
        print(f"seed {p['seed']}: held-out loss fp32 base {p['fp32']['eval_loss']:.4f}, nf4 base "
              f"{p['nf4']['eval_loss']:.4f} (nf4/fp32 = {p['nf4_over_fp32']:.4f}); train time "
              f"{p['fp32']['seconds']:.0f} s / {p['nf4']['seconds']:.0f} s; peak RSS "
              f"{p['fp32']['peak_rss_mb']:.0f} / {p['nf4']['peak_rss_mb']:.0f} MB")
    lo, hi = q["geomean_ci95"] or (None, None)
    if lo is None:
        verdict = "one seed: no interval (run more seeds)"
    elif hi <= 1.05:
        verdict = "yes (the whole interval is at or below 1.05)"
    elif lo > 1.05:
        verdict = "no (the whole interval is above 1.05)"
    else:
        verdict = "not decided at this noise (the interval holds 1.05)"
    ci = f", 95% interval {lo:.3f}-{hi:.3f}" if lo is not None else ""
    print(f"{len(q['seeds'])} seed(s): nf4/fp32 geometric mean {q['geomean_ratio']:.4f}{ci} "
          f"(arithmetic mean {q['mean_ratio']:.4f}, range {min(ratios):.4f}-{max(ratios):.4f}); "
          f"mean held-out loss fp32 {mean_fp32:.4f}, nf4 {mean_nf4:.4f} "
          f"({q['ratio_of_means']:.4f}); within 5%: {verdict}")
    for key, d in report["merge"].items():
        if key != "tokens":
            print(f"logits {key.replace('_', ' ')}: max |d| {d['max']:.4f}, mean |d| "
                  f"{d['mean']:.5f}, top-1 differs on {100 * d['top1_differs']:.1f}% of "
                  f"{report['merge']['tokens']} positions")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
