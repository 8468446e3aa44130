"""Peak memory of merging a LoRA adapter into GPT-2 small (about 500 MB in float32)
and writing the merged model: ``peftspec merge`` (streamed) against HF PEFT's load +
``merge_and_unload`` + ``save_pretrained``, each in its own process, in one run.

The base is GPT-2 small with random weights, saved locally (nothing is downloaded).
Each variant runs in a fresh subprocess; its peak RSS (ru_maxrss) is reported, and
so is a subprocess that only imports the same libraries (the interpreter's own).

Run: python bench/bench_merge.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

CHILD_PRELUDE = textwrap.dedent("""
    import json, os, resource, sys, time, warnings
    warnings.filterwarnings("ignore")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch, transformers, peft, peftspec
    from peftspec.cli import cli
""")

VARIANTS = {
    "interpreter (imports only)": "pass",
    "peftspec merge (streamed)": textwrap.dedent("""
        from peftspec.merging.stream import merge_to_dir
        merge_to_dir("hf:" + sys.argv[1], sys.argv[2], sys.argv[3] + "/ours")
    """),
    "HF PEFT load + merge_and_unload + save": textwrap.dedent("""
        base = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1])
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"],
                              fan_in_fan_out=True, init_lora_weights=False)
        model = peft.get_peft_model(base, cfg).merge_and_unload()
        model.save_pretrained(sys.argv[3] + "/hf")
    """),
}


def run(code: str, args: list[str]) -> dict:
    script = CHILD_PRELUDE + "t0 = time.perf_counter()\n" + code + textwrap.dedent("""
        print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "seconds": time.perf_counter() - t0}))
    """)
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where to write the models (a temp dir)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    base_dir, adapter = work / "gpt2", work / "lora.safetensors"
    prep = CHILD_PRELUDE + textwrap.dedent(f"""
        torch.manual_seed(0)
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        m.save_pretrained({str(base_dir)!r})
        peftspec.apply(peftspec.parse_spec('[[reparameterize]]\\nmethod = "lora"\\n'
            'modules = ["**.c_attn", "**.c_proj", "**.c_fc"]\\nr = 16\\nalpha = 32\\n'), m)
        peftspec.save_adapter(m, {str(adapter)!r})
    """)
    subprocess.run([sys.executable, "-c", prep], check=True)
    size = sum(p.stat().st_size for p in base_dir.glob("*.safetensors")) / 2**20
    rows = {name: run(code, [str(base_dir), str(adapter), str(work)])
            for name, code in VARIANTS.items()}
    interp = rows["interpreter (imports only)"]["peak_mb"]
    print(f"# merge + save of GPT-2 small ({size:.0f} MB of safetensors), peak RSS per process")
    print("| variant | peak RSS (MB) | above the interpreter's own (MB) | seconds |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_mb']:.0f} | {r['peak_mb'] - interp:.0f} | "
              f"{r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
