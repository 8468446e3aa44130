"""Adapter arithmetic: peftspec combine and HF PEFT's add_weighted_adapter, each
measured against the exact dense update, on the same two adapters.

Two LoRA adapters with random factors (``init_lora_weights=False``) are made
with HF PEFT on a tiny Llama (7 projections per layer), imported into peftspec
(``peftspec import``), and combined with weights 0.7 / 0.3 both ways. For every
combination type the script prints the relative Frobenius error over all
modules, ``sqrt(Σ‖ΔW − ref‖²) / sqrt(Σ‖ref‖²)``, where ``ref`` is the method's
dense definition on the inputs' updates ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ``:

* linear, cat, svd (and HF's dare_*: their expectation): ``Σ wᵢ·ΔWᵢ``;
* ties (ties_svd): HF PEFT's own ``merge_utils.ties`` on the dense ``ΔWᵢ``;
* magnitude_prune (_svd): ``merge_utils.magnitude_prune`` on the dense ``ΔWᵢ``.

Methods that truncate to rank R also print ``best``: the error of the best
rank-R approximation of ``ref`` (Eckart–Young), the least any rank-R result
can have. Scenarios: both plain LoRA (r 4, alphas 8 and 16), and the first
one rsLoRA (HF PEFT copies the first adapter's config, ``use_rslora``
included, into the combined one).

Run with any HF PEFT: ``PYTHONPATH=/tmp/peft-0.18 python bench/bench_combine.py``
(``pip install --no-deps --target /tmp/peft-0.18 peft==0.18.1``). Nothing is
timed; the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = [0.7, 0.3]
DENSITY = 0.5


def tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=128, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_model(scenario):
    import peft

    model = tiny_llama()
    first = dict(r=4, lora_alpha=8, use_rslora=scenario == "rslora-first")
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS,
                                                    init_lora_weights=False, **first),
                             adapter_name="one")
    torch.manual_seed(2)
    pm.add_adapter("two", peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=16,
                                        init_lora_weights=False))
    return pm


def lora_layers(pm):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def references(pm, rank):
    """ref per dense definition, per module: {kind: {module: tensor}}."""
    from peft.utils import merge_utils

    w = torch.tensor(WEIGHTS)
    out = {"sum": {}, "ties": {}, "magnitude_prune": {}}
    for name, layer in lora_layers(pm).items():
        d = [layer.get_delta_weight(a).detach().double() for a in ("one", "two")]
        out["sum"][name] = merge_utils.task_arithmetic(d, w.double())
        out["ties"][name] = merge_utils.ties(d, w.double(), DENSITY, "total")
        out["magnitude_prune"][name] = merge_utils.magnitude_prune(d, w.double(), DENSITY)
    return out


def rel_error(got: dict, ref: dict) -> float:
    num = sum(float((got[k] - ref[k]).square().sum()) for k in ref)
    den = sum(float(ref[k].square().sum()) for k in ref)
    return math.sqrt(num / den)


def best(ref: dict, rank: int) -> float:
    got = {}
    for k, m in ref.items():
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        got[k] = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return rel_error(got, ref)


HF_TYPES = {  # combination type -> (reference, truncates to R)
    "linear": ("sum", False), "cat": ("sum", False), "svd": ("sum", True),
    "ties": ("ties", False), "ties_svd": ("ties", True),
    "magnitude_prune": ("magnitude_prune", False), "magnitude_prune_svd": ("magnitude_prune", True),
    "dare_linear": ("sum", False), "dare_linear_svd": ("sum", True),
    "dare_ties": ("ties", False), "dare_ties_svd": ("ties", True),
}
OURS = {  # peftspec method -> reference
    "linear": "sum", "cat": "sum", "svd": "sum", "ties": "ties", "dare_linear": "sum",
    "dare_ties": "ties",
}


def hf_rows(scenario, rank):
    rows = []
    for ctype, (ref_kind, truncates) in HF_TYPES.items():
        pm = hf_model(scenario)
        ref = references(pm, rank)[ref_kind]
        kwargs = {"density": DENSITY} if "ties" in ctype or "dare" in ctype or \
            "magnitude" in ctype else {}
        if truncates:
            kwargs["svd_rank"] = rank
        torch.manual_seed(3)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm.add_weighted_adapter(["one", "two"], WEIGHTS, "mix", combination_type=ctype,
                                        **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            rows.append((f"HF {ctype}", ref_kind, None, None, f"{type(exc).__name__}: {exc}"))
            continue
        got = {n: layer.get_delta_weight("mix").detach().double()
               for n, layer in lora_layers(pm).items()}
        note = "vs expectation" if "dare" in ctype else ""
        rows.append((f"HF {ctype}", ref_kind, rel_error(got, ref),
                     best(ref, rank) if truncates else None, note))
    return rows


def ours_rows(scenario, rank, tmp: Path):
    import peftspec
    from peftspec.merging.combine import combine

    pm = hf_model(scenario)
    refs = references(pm, rank)
    files = []
    for name in ("one", "two"):
        pm.set_adapter(name)
        pm.save_pretrained(tmp / scenario, selected_adapters=[name])
        src = tmp / scenario / name  # save_pretrained puts a non-default adapter there
        out = tmp / f"{scenario}-{name}.safetensors"
        peftspec.import_hf_peft(src, out, tmp / f"{scenario}-{name}.toml", model=tiny_llama())
        files.append(out)
    rows = []
    for method, ref_kind in OURS.items():
        kwargs = {"density": DENSITY} if method in ("ties", "dare_linear", "dare_ties") else {}
        if method not in ("linear", "cat"):
            kwargs["rank"] = rank
        out = tmp / f"{scenario}-{method}.safetensors"
        combine(files, WEIGHTS, method=method, out=out, **kwargs)
        got = deltas_of(out)
        ref = refs[ref_kind]
        note = "vs expectation" if "dare" in method else ""
        rows.append((f"peftspec {method}", ref_kind, rel_error(got, ref),
                     best(ref, rank) if "rank" in kwargs else None, note))
    return rows


def deltas_of(path: Path) -> dict:
    """ΔW per module of a combined file (its rules have alpha = r: scale 1), keyed
    as HF PEFT names the layers."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    return {f"base_model.model.{k[:-len('.lora_A')]}":
            t[k[:-1] + "B"].double() @ t[k].double() for k in t if k.endswith(".lora_A")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=4, help="svd_rank / --rank for truncating types")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import peft

    warnings.simplefilter("ignore")  # transformers' and peft's deprecation chatter
    print(f"HF PEFT {peft.__version__}, torch {torch.__version__}; weights {WEIGHTS}, "
          f"density {DENSITY}, rank {args.rank}; tiny Llama, 7 projections x 2 layers")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in ("plain", "rslora-first"):
            rows = hf_rows(scenario, args.rank) + ours_rows(scenario, args.rank, Path(tmp))
            results[scenario] = rows
            print(f"\n{scenario}: one = r 4 alpha 8{' rsLoRA' if 'rslora' in scenario else ''}"
                  ", two = r 4 alpha 16")
            print("| method | reference | rel. error | best at rank R | note |")
            print("|---|---|---|---|---|")
            for name, ref, err, best_err, note in rows:
                e = "failed" if err is None else f"{err:.2e}"
                b = "" if best_err is None else f"{best_err:.2e}"
                print(f"| {name} | {ref} | {e} | {b} | {note} |")
    if args.json:
        print(json.dumps({"peft": peft.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
