"""The core package alone, end to end: run by .ci/run in a venv made with
`pip install -c constraints.txt .` (no extras, no test helpers), so that a
dependency the core uses but does not declare (numpy was one) fails CI.

It checks, plans and applies a LoRA spec on the built-in model through the
CLI (`apply --out`), loads the adapter through the Python API, trains a step,
saves it again, merges it through the CLI and through the API, and compares
every result exactly (merge: to float rounding)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SPEC = """
[[reparameterize]]
method = "lora"
modules = ["**.q_proj", "**.v_proj"]
r = 4
"""


def sh(*args: str) -> str:
    exe = Path(sys.executable).with_name("peftspec")
    done = subprocess.run([str(exe), *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"peftspec {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits


def main() -> None:
    for extra in ("numpy", "transformers", "hypothesis", "pytest"):
        if importlib.util.find_spec(extra) is not None:
            sys.exit(f"{extra} is installed: this smoke test must run on the core package alone")
    import peftspec
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec_file = tmp / "spec.toml"
        spec_file.write_text(SPEC)
        sh("check", str(spec_file))
        sh("plan", str(spec_file))
        first = tmp / "a.safetensors"
        sh("apply", str(spec_file), "--out", str(first))

        ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
        base = peftspec.load_model()
        before = {n: p.detach().clone() for n, p in base.named_parameters()}
        model = peftspec.load_adapter(base, first)
        with torch.no_grad():  # a trained adapter: B != 0, so merging changes the weights
            for p in peftspec.trainable_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        unmerged = logits(model, ids)
        trained = tmp / "b.safetensors"
        peftspec.save_adapter(model, trained)

        again = peftspec.load_adapter(peftspec.load_model(), trained)
        out = logits(again, ids)
        assert torch.equal(out, unmerged), "save + load changed the outputs"
        peftspec.remove(model)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), \
            "remove did not restore the base bit for bit"

        merged = peftspec.merge(again)
        out = logits(merged, ids)
        assert torch.allclose(out, unmerged, atol=1e-5, rtol=0), "merge changed the outputs"

        sh("merge", "--adapter", str(trained), "--out", str(tmp / "merged"))
        written = load_file(str(tmp / "merged" / "model.safetensors"))
        ours = merged.state_dict()
        assert set(written) <= set(ours) and written, "merged file names differ"
        assert all(torch.equal(written[k], ours[k]) for k in written), \
            "peftspec merge wrote other weights than peftspec.merge"
    print("core-only smoke: check, plan, apply --out, load, save, remove, merge passed "
          f"(torch {torch.__version__}, no numpy)")


if __name__ == "__main__":
    main()
