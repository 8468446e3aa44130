"""A quantized frozen base (``[[freeze]]``): bytes, peak memory and tokens/s of training.

A randomly initialised Llama of TinyLlama-1.1B's shape (hidden 2048, MLP
5632, 32 query / 4 key-value heads, vocabulary 32000; ``--layers`` of its 22
layers, seeded, no download), LoRA r=16 (alpha 32) on every projection
(q, k, v, o, gate, up, down), batch 2 x 256, gradient checkpointing on,
AdamW on the LoRA parameters. One process per variant, so that each peak is
its own:

* ``fp32``: the float32 base, no ``[[freeze]]`` (the reference);
* ``bf16``, ``nf4``, ``int8``: ``[[freeze]]`` of every projection and
  ``lm_head``, and for bf16 and int8 the embedding table too (nf4 stores
  Linear weights only, as QLoRA does: the table stays float32);
* ``hf``: HF PEFT's quantized path that runs on this CPU: transformers'
  ``BitsAndBytesConfig`` 4-bit NF4 (compute float32) with HF PEFT's LoRA when
  ``bitsandbytes`` imports, otherwise transformers' ``TorchAoConfig`` int8
  weight-only; the table says which ran. The model is saved with
  ``save_pretrained`` to a temporary folder and loaded quantized from there.

Figures per variant: bytes of the frozen linear weights as stored / float32;
peak RSS of the training steps (the kernel's high-water mark ``VmHWM``, reset
through ``/proc/self/clear_refs`` after the model is built and quantized and
freed memory returned with ``malloc_trim``, so it is the step's peak, not the
float32 build's); median tokens/s of the steps after the first (warm-up).
Ratios are against ``fp32`` of the same run. Goals (issue 11): nf4 bytes
<= 0.135, peak nf4 <= 0.40x and bf16 <= 0.60x, tokens/s nf4 >= 0.6x.

``--malloc``: glibc's allocator as it comes (``default``: its mmap threshold
grows to the largest block freed, up to 32 MiB, so activation-sized blocks
then come from the heap, and the freed ones fragment it: at 22 layers the
step's peak grows by up to 1 GB) or with the threshold fixed at 1 MiB
(``fixed``, ``MALLOC_MMAP_THRESHOLD_=1048576``, what ``peftspec train`` sets
when a spec has ``[[freeze]]`` rules: every block over 1 MiB is mapped and
returned on free). Every variant of a run uses the same setting.

Run ``python bench/bench_quant.py`` (22 layers: several GiB and minutes per
variant on 2 cores), ``--layers 4`` on a busy machine, ``--steps``,
``--variants fp32,nf4``, ``--json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchenv import loadavg, status_mb

REPO = Path(__file__).resolve().parent.parent
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["fp32", "bf16", "nf4", "int8", "hf"]


def llama(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=2048, tie_word_embeddings=False,
                      use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


def spec_text(method: str | None) -> str:
    lines = []
    if method:
        # int8 and bf16 store the embedding table too (a lookup reads its rows); nf4
        # stores Linear weights only, and the table stays float32
        table = ', "model.embed_tokens"' if method in ("int8", "bf16") else ""
        lines += ["[[freeze]]", f'method = "{method}"',
                  'modules = ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj", '
                  f'"lm_head"{table}]']
    lines += ["[[reparameterize]]", 'method = "lora"',
              "modules = [" + ", ".join(f'"**.{p}"' for p in PROJ) + "]", "r = 16",
              "alpha = 32"]
    return "\n".join(lines) + "\n"


def _trim_and_reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the peak then includes freed build memory
        pass
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")


def _train(model, params, steps: int, batch: int, seq: int) -> list[float]:
    import torch

    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, 32000, (batch, seq), generator=g)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def worker(variant: str, layers: int, steps: int, batch: int, seq: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    out = {"variant": variant, "layers": layers}
    t0 = time.perf_counter()
    if variant == "hf":
        model, params, out["ran"], out["bytes_ratio"] = _hf_model(layers)
    else:
        import peftspec

        model = llama(layers)
        plan = peftspec.compile_plan(peftspec.parse_spec(
            spec_text(None if variant == "fp32" else variant)), model)
        peftspec.apply_plan(plan, model)
        if plan.frozen:
            out["bytes_ratio"] = (sum(a for _, a in plan.frozen.values()) /
                                  sum(b for b, _ in plan.frozen.values()))
        else:
            out["bytes_ratio"] = 1.0
        out["ran"] = "peftspec " + variant
        params = list(peftspec.trainable_parameters(model).values())
    out["setup_s"] = time.perf_counter() - t0
    _trim_and_reset_peak()
    out["rss_before_mb"] = status_mb("VmRSS")
    times = _train(model, params, steps, batch, seq)
    out["peak_mb"] = status_mb("VmHWM")
    out["step_s"] = times
    kept = times[1:] or times
    out["tokens_per_s"] = batch * seq / statistics.median(kept)
    return out


def _hf_model(layers: int):
    """HF PEFT's quantized path: bitsandbytes 4-bit if it imports, else torchao int8."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    folder = tempfile.mkdtemp(prefix="bench-quant-")
    base = llama(layers)
    base.save_pretrained(folder)
    dense = {n: p.numel() * 4 for n, p in base.named_parameters()
             if n.endswith("_proj.weight") or n == "lm_head.weight"}
    del base
    gc.collect()
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        ran = "HF PEFT + bitsandbytes 4-bit nf4 (double quant)"
    except ImportError:
        from transformers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        q = TorchAoConfig(Int8WeightOnlyConfig())
        ran = "HF PEFT + transformers TorchAoConfig int8 weight-only"
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu",
                                             dtype=torch.float32)
    stored = 0
    for n, p in model.named_parameters():
        if n.endswith("_proj.weight") or n == "lm_head.weight":
            stored += _hf_stored_bytes(p)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJ,
                                             lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return model, params, ran, stored / max(sum(dense.values()), 1)


def _hf_stored_bytes(p) -> int:
    """Bytes a quantized HF parameter holds (bitsandbytes packs into uint8 storage;
    torchao tensor subclasses hold inner tensors)."""
    inner = getattr(p, "__tensor_flatten__", None)
    if inner is not None and type(p).__name__ not in ("Parameter", "Tensor", "Params4bit"):
        names, _ = p.__tensor_flatten__()
        return sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names)
    extra = 0
    qs = getattr(p, "quant_state", None)
    if qs is not None:  # absmax (and its double quantization) beside the codes
        for t in (getattr(qs, "absmax", None), getattr(getattr(qs, "state2", None), "absmax",
                                                          None)):
            if t is not None:
                extra += t.numel() * t.element_size()
    return p.numel() * p.element_size() + extra


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--malloc", choices=["fixed", "default"], default="fixed",
                    help="glibc's mmap threshold: fixed at 1 MiB (as peftspec train sets it "
                         "for a quantized base) or glibc's dynamic default")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.layers, args.steps, args.batch,
                                            args.seq)))
        return
    rows = []
    load_before = loadavg()
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--worker", variant, "--layers", str(args.layers),
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        if args.malloc == "fixed":
            env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{variant}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}",
                  file=sys.stderr)
            continue
        rows.append(json.loads(line[7:]))
        print(f"... {variant} done", file=sys.stderr, flush=True)
    ref = next((r for r in rows if r["variant"] == "fp32"), None)
    print(f"bench_quant: TinyLlama-1.1B shape, {args.layers} of 22 layers, LoRA r=16 on all "
          f"projections, batch {args.batch}x{args.seq}, gradient checkpointing, AdamW, "
          f"{args.steps} steps (first dropped), malloc {args.malloc}")
    print(f"load average before: {load_before}, after: {loadavg()}")
    head = f"{'variant':8} {'bytes/fp32':>10} {'peak MiB':>9} {'x fp32':>7} {'tok/s':>8} " \
           f"{'x fp32':>7} {'setup s':>8}  what ran"
    print(head)
    for r in rows:
        pk = r["peak_mb"] / ref["peak_mb"] if ref else float("nan")
        tk = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
        print(f"{r['variant']:8} {r['bytes_ratio']:>10.3f} {r['peak_mb']:>9.0f} {pk:>7.2f} "
              f"{r['tokens_per_s']:>8.1f} {tk:>7.2f} {r['setup_s']:>8.1f}  {r['ran']}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
