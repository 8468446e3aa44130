"""QLoRA on SmolLM2-135M-Instruct (``--model smollm2``): quality and the two merges.

1. **Quality**: the quick start's LoRA (r=16 on all seven projections, the
   Brindlecombe data, ``specs/smollm2-lora.toml``'s training options) trained
   twice, same steps, data and seed: on the float32 base, and with
   ``[[freeze]] nf4`` on all seven projections. Prints both held-out losses
   (``data/brindlecombe-heldout.jsonl``) and their ratio (goal: within 5%).
2. **Merge onto the original or the dequantized weights**: the nf4-trained
   adapter merged both ways (``peftspec.merge`` after ``load_adapter(...,
   freeze=True/False)``, then dense), and the logits of the held-out prompts
   compared: each merge against the unmerged QLoRA model (what was trained),
   and the two merges against each other (max and mean absolute difference,
   and how often the top-1 token differs).

``scaler_block_size = 64``: SmolLM2's k/v projections (192 x 576) have 1,728
blocks of 64 weights, which 256 does not divide (torchao's format needs it to).

Run ``python bench/bench_quant_smollm2.py`` (a few minutes on 2 cores);
``--steps`` to shorten.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import peftspec
    from peftspec.frozen import thaw
    from peftspec.train.config import TrainConfig
    from peftspec.train.loop import train

    reg = peftspec.build_registry()
    spec_dir = REPO / "specs"
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="qlora-smollm2-"))
    t_all = time.perf_counter()
    for name, text in (("fp32", LORA), ("nf4", LORA + FREEZE)):
        spec = peftspec.parse_spec(text, file=str(spec_dir / f"smollm2-{name}.toml"))
        cfg = TrainConfig.resolve(**{**spec.train_config,
                                     "data": str(REPO / "data" / "brindlecombe-train.jsonl"),
                                     "eval": str(REPO / "data" / "brindlecombe-heldout.jsonl"),
                                     "steps": args.steps, "eval_every": 0})
        t0 = time.perf_counter()
        r = train(spec, cfg, model_source="smollm2", registry=reg,
                  out=tmp / f"{name}.safetensors")
        results[name] = {"eval_loss": r.eval_loss, "train_loss": r.train_loss,
                         "seconds": time.perf_counter() - t0, "peak_rss_mb": r.peak_rss_mb}
        print(f"... trained {name}: held-out loss {r.eval_loss:.4f}", file=sys.stderr)

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
        "quality": {**results, "nf4_over_fp32": results["nf4"]["eval_loss"] /
                    results["fp32"]["eval_loss"]},
        "merge": {"original_vs_trained": diff(merged["original"], trained),
                  "dequantized_vs_trained": diff(merged["dequantized"], trained),
                  "original_vs_dequantized": diff(merged["original"], merged["dequantized"]),
                  "tokens": int(batch["attention_mask"].sum())},
        "seconds": time.perf_counter() - t_all,
    }
    q = report["quality"]
    print(f"QLoRA on SmolLM2-135M-Instruct, {args.steps} steps, load {report['load_average']}")
    print(f"held-out loss: fp32 base {q['fp32']['eval_loss']:.4f}, nf4 base "
          f"{q['nf4']['eval_loss']:.4f} (nf4/fp32 = {q['nf4_over_fp32']:.4f}); train time "
          f"{q['fp32']['seconds']:.0f} s / {q['nf4']['seconds']:.0f} s; peak RSS "
          f"{q['fp32']['peak_rss_mb']:.0f} / {q['nf4']['peak_rss_mb']:.0f} MB")
    for key, d in report["merge"].items():
        if key != "tokens":
            print(f"logits {key.replace('_', ' ')}: max |d| {d['max']:.4f}, mean |d| "
                  f"{d['mean']:.5f}, top-1 differs on {100 * d['top1_differs']:.1f}% of "
                  f"{report['merge']['tokens']} positions")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
