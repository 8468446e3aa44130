"""GPU checks (CUDA, bf16). Skipped where no CUDA device is present, as in CI;
run them on a GPU machine with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import textwrap

import pytest
import torch

import peftspec
from peftspec.models.nanogpt import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPEC = textwrap.dedent("""
    [[train]]
    params = ["**.bias"]
    [[reparameterize]]
    method = "lora"
    modules = ["**.q_proj", "**.v_proj", "**.up_proj"]
    r = 8
    alpha = 16
    [[reparameterize]]
    method = "lora"
    modules = ["**.down_proj", "**.o_proj"]
    r = 4
    dora = true
""")


def model_on(device, dtype):
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_train_save_on_cuda(dtype, tmp_path):
    model = model_on("cuda", dtype)
    ids = torch.randint(0, 257, (4, 32), device="cuda")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(ids).logits
    peftspec.apply(peftspec.parse_spec(SPEC), model)
    for p in peftspec.adapter_params(model).values():
        assert p.device.type == "cuda" and p.dtype == dtype
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)  # zero-init: unchanged, bit for bit
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trainable = peftspec.trainable_parameters(model)
    for n, p in model.named_parameters():
        if n in frozen_before and n not in trainable:
            assert torch.equal(p, frozen_before[n]), n
    path = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, path)
    # the file loads onto the same base on the CPU, in float32
    cpu = model_on("cpu", torch.float32)
    peftspec.load_adapter(cpu, path)
    model.eval()
    with torch.no_grad():
        gpu_out = model(ids).logits.float().cpu()
        cpu_out = cpu.to(dtype).float().eval()(ids.cpu()).logits
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert (gpu_out - cpu_out).abs().max().item() < tol


def test_bf16_merge_matches_unmerged():
    """Merge math runs in float32 and casts once: bf16 merged outputs stay within
    bf16 rounding of the unmerged model (max abs error < 0.05 on logits ~N(0, 1))."""
    model = model_on("cuda", torch.bfloat16)
    peftspec.apply(peftspec.parse_spec(SPEC), model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peftspec.adapter_params(model).values():
            p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(0, 257, (4, 32), device="cuda")
    model.eval()
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        peftspec.merge(model)
        merged = model(ids).logits.float()
    assert not peftspec.is_patched(model)
    err = (merged - unmerged).abs().max().item()
    print(f"bf16 merge max abs error on logits: {err:.4g}")
    assert err < 0.05


def test_rows_and_prompts_on_cuda_bf16(tmp_path):
    """Per-row LoRA/DoRA/prompt batches and cached generation, on the GPU in bf16."""
    specs = {
        "lora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.v_proj"]',
        "dora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\ndora = true',
        "prompt": '[prefix]\nmethod = "prompt-tuning"\ntokens = 3',
    }
    model = model_on("cuda", torch.bfloat16)
    for i, (name, text) in enumerate(specs.items()):
        single = model_on("cuda", torch.bfloat16)
        torch.manual_seed(i)
        peftspec.apply(peftspec.parse_spec(text), single)
        with torch.no_grad():
            for p in peftspec.trainable_parameters(single).values():
                p.add_(torch.randn_like(p) * 0.1)
        peftspec.save_adapter(single, tmp_path / f"{name}.safetensors")
        peftspec.load_adapter(model, tmp_path / f"{name}.safetensors", name=name)
    names = ["lora", "prompt", None, "dora"]
    ids = torch.randint(0, 257, (4, 12), device="cuda")
    with torch.no_grad(), peftspec.rows(model, names):
        together = model(ids).logits[:, -12:].float()
    for i, name in enumerate(names):
        with torch.no_grad(), peftspec.using(model, name):
            alone = model(ids[i:i + 1]).logits[:, -12:].float()
        assert (together[i:i + 1] - alone).abs().max().item() < 0.05, name  # bf16 rounding
    peftspec.use(model, "prompt")
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    a = model.generate(ids, 5, attention_mask=mask, use_cache=True)
    b = model.generate(ids, 5, attention_mask=mask, use_cache=False)
    assert a.device.type == "cuda" and a.shape == (4, 17)
    assert (a == b).float().mean().item() > 0.9  # bf16 cache vs recompute may flip rare ties
