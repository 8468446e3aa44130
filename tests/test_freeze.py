"""``[[freeze]]``: nf4 / int8 / bf16 storage of the frozen base, and everything on top.

The compile-time rules (what cannot be frozen, named), the bytes a plan
reports, computation through a packed weight (equal to the dense matmul on
the dequantized weight), composition with every adapter family, merge into
dense weights of the original dtype, loading with and without the freeze
rules, rollback of a failed load, and that ``import peftspec`` stays free of
torchao.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftspec
from peftspec.core.errors import AdapterFileError, PeftspecError, SpecError
from peftspec.core.packed import (dequantized, frozen_modules, is_packed, packed_parameters,
                             stored_bytes, stored_tensors, thaw)
from toymodels import ToyConfig, ToyNet

LINEARS = '["blocks.*.attn.*", "blocks.*.mlp.0", "blocks.*.mlp.2"]'
NF4_SMALL = "block_size = 16\nscaler_block_size = 1"
METHODS = {"nf4": NF4_SMALL, "int8": "", "bf16": ""}


def toy(**kw):
    return ToyNet(ToyConfig(d=16, hidden=32, **kw))


def spec(method="nf4", extra=None, modules=LINEARS, more=""):
    extra = METHODS[method] if extra is None else extra
    return peftspec.parse_spec(f'[[freeze]]\nmethod = "{method}"\nmodules = {modules}\n'
                               f"{extra}\n{more}")


LORA = '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.attn.q", "**.mlp.2"]\nr = 2\n'


def needs(method):
    if method == "nf4":
        pytest.importorskip("torchao")


@pytest.fixture(params=list(METHODS))
def method(request):
    needs(request.param)
    return request.param


def test_spec_section_and_options():
    needs("nf4")
    s = spec("nf4", "block_size = 32\nscaler_block_size = 2")
    (rule,) = s.rules_of("freeze")
    assert (rule.method, rule.options.block_size, rule.options.scaler_block_size) == \
        ("nf4", 32, 2)
    with pytest.raises(SpecError, match="block_sise"):
        spec("nf4", "block_sise = 32")
    with pytest.raises(SpecError, match=r"belongs in \[\[reparameterize\]\]"):
        spec("lora", "")


def test_compile_errors_name_the_modules():
    needs("nf4")
    with pytest.raises(SpecError) as exc:  # Embedding, and a block that does not divide
        peftspec.compile_plan(spec("nf4", "block_size = 48", modules='["emb", "blocks.0.attn.q"]'),
                              toy())
    text = str(exc.value)
    assert "'emb' (Embedding)" in text and "looked up, not multiplied" in text
    assert "'blocks.0.attn.q'" in text and "block_size = 48" in text
    with pytest.raises(SpecError, match="tied to 'emb'"):  # a tied weight
        peftspec.compile_plan(spec("int8", modules='["head"]'), toy(tied=True))
    # optional = true: freeze what can be, skip the rest
    plan = peftspec.compile_plan(spec("nf4", modules='["emb", "type:Linear"]',
                                      more="optional = true"), toy(tied=True))
    assert "emb" not in plan.frozen and "head" not in plan.frozen
    assert "blocks.0.attn.q" in plan.frozen
    with pytest.raises(SpecError, match="a frozen weight cannot be trained"):
        peftspec.compile_plan(spec("int8", more='[[train]]\nparams = ["blocks.0.attn.q.weight"]'),
                              toy())


def test_plan_bytes(method):
    model = toy()
    plan = peftspec.compile_plan(spec(method), model)
    dense = sum(p.numel() * 4 for n, p in model.named_parameters())
    assert plan.base_bytes_before == dense
    frozen_dense = sum(b for b, _ in plan.frozen.values())
    frozen_after = sum(a for _, a in plan.frozen.values())
    assert plan.base_bytes_after == dense - frozen_dense + frozen_after
    peftspec.apply_plan(plan, model)
    got = sum(stored_bytes(model.get_submodule(t).weight) for t in plan.frozen)
    assert got == frozen_after  # the plan's estimate is what packing stores
    ratio = frozen_after / frozen_dense
    assert ratio < {"nf4": 0.25, "int8": 0.32, "bf16": 0.51}[method]
    assert plan.to_dict()["base_bytes"] == {"before": plan.base_bytes_before,
                                            "after": plan.base_bytes_after,
                                            "frozen_modules": 8}


def test_nf4_ratio_at_default_blocks():
    needs("nf4")
    lin = nn.Sequential(nn.Linear(512, 512, bias=False))
    plan = peftspec.compile_plan(spec("nf4", "", modules='["0"]'), lin)
    before, after = plan.frozen["0"]
    assert after / before <= 0.135  # QLoRA's ~4.13 bits per weight


def test_nf4_matches_torchao_bit_for_bit():
    pytest.importorskip("torchao")
    from peftspec_plugins.quant import _torchao_nf4_tensor

    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[3, :64] = 0.0  # an all-zero block
    model = nn.Sequential(nn.Linear(256, 64, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    peftspec.apply_plan(peftspec.compile_plan(spec("nf4", "block_size = 64\n"
                                                   "scaler_block_size = 4",
                                                   modules='["0"]'), model), model)
    ref = _torchao_nf4_tensor().from_tensor(w, 64, 4)
    packed = model[0].weight
    assert torch.equal(packed.stored["codes"], ref.quantized_data)
    assert torch.equal(packed.stored["scalers"], ref.quantized_scalers)
    assert torch.equal(packed.dequantize(), ref.get_original_weight())


def test_linear_through_packed_weight_is_the_dense_matmul(method):
    model = toy()
    q = model.blocks[0].attn["q"]
    peftspec.apply_plan(peftspec.compile_plan(spec(method), model), model)
    x = torch.randn(3, 16, requires_grad=True)
    w = dequantized(q.weight)
    assert not is_packed(w) and w.dtype == torch.float32
    y = q(x)
    assert torch.equal(y, F.linear(x, w, q.bias))
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w, q.bias).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    assert q.weight.grad is None


@pytest.mark.parametrize("method", ["int8", "bf16"])
def test_an_embedding_table_in_int8_or_bf16_looks_up_only_its_rows(method):
    """int8 and bf16 store an Embedding's weight too (one int8 scale per row is
    one per token); a lookup is the dense lookup of the dequantized table, a
    soft prompt initialised from the vocabulary reads it, LoRA trains beside it
    and its bytes stay; trainable tokens (which write rows) refuse it."""
    model = toy()
    emb = model.emb
    n = emb.weight.numel()
    plan = peftspec.compile_plan(spec(method, modules='["emb"]', more=LORA), model)
    assert plan.frozen["emb"] == (n * 4, n + emb.num_embeddings * 4 if method == "int8"
                                  else n * 2)
    peftspec.apply_plan(plan, model)
    assert is_packed(emb.weight)
    ids = torch.randint(0, emb.num_embeddings, (3, 5))
    dense = dequantized(emb.weight)
    assert torch.equal(emb(ids), F.embedding(ids, dense))
    assert emb(ids).dtype == torch.float32
    before = {k: v.clone() for k, v in stored_tensors(emb.weight).items()}
    opt = torch.optim.AdamW(peftspec.trainable_parameters(model).values(), lr=0.1)
    model(input_ids=ids).square().mean().backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in stored_tensors(emb.weight).items())

    prompted = toy()
    peftspec.apply(spec(method, modules='["emb"]', more='[prefix]\nmethod = "prompt-tuning"\n'
                        'tokens = 3\ninit = "vocab"\n'), prompted)
    table = next(iter(peftspec.trainable_parameters(prompted).values()))
    rows = dequantized(prompted.emb.weight)
    assert all(any(torch.equal(r, v) for v in rows) for r in table.detach())
    with pytest.raises(SpecError, match="trainable tokens write rows"):
        peftspec.apply(spec(method, modules='["emb"]', more='[[reparameterize]]\nmethod = '
                            '"trainable-tokens"\nmodules = ["emb"]\ntoken_indices = [1, 2]\n'),
                       toy())
    with pytest.raises(SpecError, match="max_norm"):
        capped = toy()
        capped.emb.max_norm = 1.0
        peftspec.compile_plan(spec(method, modules='["emb"]'), capped)


def test_packed_weight_refuses_silent_writes(method):
    model = toy()
    peftspec.apply_plan(peftspec.compile_plan(spec(method), model), model)
    w = model.blocks[0].attn["q"].weight
    with pytest.raises(PeftspecError, match="requantize"):
        with torch.no_grad():
            w.copy_(torch.zeros(16, 16))
    with pytest.raises(PeftspecError, match="dequantized"):
        w + 1


@pytest.mark.parametrize("adapter", ["lora", "rslora", "dora", "bottleneck", "prompt"])
def test_adapters_compose_on_a_frozen_base(method, adapter):
    rules = {
        "lora": LORA,
        "rslora": LORA + "rslora = true\n",
        "dora": LORA + "dora = true\n",
        "bottleneck": '[[augment]]\nmethod = "bottleneck"\nafter = ["**.mlp"]\nsize = 3\n',
        "prompt": '[prefix]\nmethod = "prompt-tuning"\ntokens = 2\n',
    }[adapter]
    model = toy()
    x = torch.randint(0, 11, (2, 5))
    peftspec.apply_plan(peftspec.compile_plan(spec(method, more=rules), model), model)
    stored = {n: {k: v.clone() for k, v in stored_tensors(p).items()}
              for n, p in packed_parameters(model).items()}
    assert len(stored) == 8
    with peftspec.disabled(model):
        base_out = model(x)
    opt = torch.optim.AdamW(peftspec.trainable_parameters(model).values(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert not torch.equal(model(x), base_out)  # it learned something
    with peftspec.disabled(model):
        assert torch.equal(model(x), base_out)
    for n, p in packed_parameters(model).items():
        for k, v in stored_tensors(p).items():
            assert torch.equal(v, stored[n][k]), (n, k)
    _no_float_copy(model)
    peftspec.remove(model)
    assert len(packed_parameters(model)) == 8  # removal keeps the storage (no float copy)


def _no_float_copy(model):
    """No module keeps a dense tensor the shape of a frozen weight (DoRA's norm, LoRA's
    base, a cache): the packed storage is the only copy."""
    shapes = {tuple(p.shape) for p in packed_parameters(model).values()}
    for path, m in model.named_modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()) + \
                [(k, v) for k, v in vars(m).items() if isinstance(v, torch.Tensor)]:
            if t is not None and not is_packed(t) and tuple(t.shape) in shapes and \
                    t.numel() > 16 * 11:  # not an embedding-sized tensor of ToyNet
                raise AssertionError(f"{path}.{name} is a dense {tuple(t.shape)} tensor")


def test_named_adapters_and_rows_share_the_frozen_base(method):
    model = toy()
    x = torch.randint(0, 11, (3, 5))
    a = spec(method, more=LORA)
    peftspec.apply_plan(peftspec.compile_plan(a, model), model, name="a")
    packed = {n: id(p) for n, p in packed_parameters(model).items()}
    b = spec(method, more=LORA.replace('"**.mlp.2"', '"**.attn.o"'))
    peftspec.apply_plan(peftspec.compile_plan(b, model), model, name="b")
    assert {n: id(p) for n, p in packed_parameters(model).items()} == packed  # not re-packed
    for name in ("a", "b"):
        peftspec.use(model, name)
        for p in peftspec.trainable_parameters(model).values():
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    outs = {}
    for name in ("a", "b", None):
        peftspec.use(model, name)
        outs[name] = model(x)
    with peftspec.rows(model, ["a", None, "b"]):
        mixed = model(x)
    assert torch.allclose(mixed[0], outs["a"][0], atol=1e-5)
    assert torch.allclose(mixed[1], outs[None][1], atol=1e-5)
    assert torch.allclose(mixed[2], outs["b"][2], atol=1e-5)
    # a second adapter asking for other storage of the same module is refused
    other = "int8" if method != "int8" else "bf16"
    needs(other)
    with pytest.raises(SpecError, match="stored as .* already"):
        peftspec.compile_plan(spec(other, more=LORA), model)


def test_merge_writes_dense_weights_of_the_original_dtype(method):
    model = toy()
    x = torch.randint(0, 11, (2, 5))
    peftspec.apply_plan(peftspec.compile_plan(spec(method, more=LORA + "dora = true\n"),
                                              model), model)
    for p in peftspec.trainable_parameters(model).values():
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    want = model(x)
    peftspec.merge(model)
    q = model.blocks[0].attn["q"]
    assert type(q) is nn.Linear and not is_packed(q.weight) and q.weight.dtype == torch.float32
    assert torch.allclose(model(x), want, atol=1e-4)
    assert is_packed(model.blocks[0].attn["o"].weight)  # not adapted: still stored packed
    thawed = thaw(model)
    assert "blocks.0.attn.o.weight" in thawed and not packed_parameters(model)
    assert torch.allclose(model(x), want, atol=1e-4)


def test_load_adapter_applies_or_skips_freeze_rules(tmp_path, method, caplog):
    model = toy()
    peftspec.apply_plan(peftspec.compile_plan(spec(method, more=LORA), model), model)
    for p in peftspec.trainable_parameters(model).values():
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 11, (2, 5))
    want = model(x)
    path = peftspec.save_adapter(model, tmp_path / "q.safetensors")
    fresh = toy()
    with caplog.at_level("INFO", logger="peftspec"):
        peftspec.load_adapter(fresh, path)
    assert "applied its [[freeze]] rules" in caplog.text
    assert len(frozen_modules(fresh)) == 8
    assert torch.equal(fresh(x), want)  # deterministic quantization: the very same base
    for n, p in packed_parameters(fresh).items():  # stored bytes equal the trained model's
        ref = dict(model.named_parameters())[n]
        for k, v in stored_tensors(p).items():
            assert torch.equal(v, stored_tensors(ref)[k])
    full = toy()
    caplog.clear()
    with caplog.at_level("INFO", logger="peftspec"):
        peftspec.load_adapter(full, path, freeze=False)
    assert "skipped its [[freeze]] rules" in caplog.text
    assert not packed_parameters(full) and not frozen_modules(full)
    tol = {"nf4": 1.0, "int8": 0.05, "bf16": 0.02}[method]
    assert (full(x) - want).abs().max() < tol  # the same adapter on the 16/32-bit base


def test_failed_load_leaves_the_base_unquantized(tmp_path):
    model = toy()
    peftspec.apply_plan(peftspec.compile_plan(spec("int8", more=LORA), model), model)
    good = peftspec.save_adapter(model, tmp_path / "a.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[next(iter(tensors))] = torch.full_like(next(iter(tensors.values())), float("nan"))
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    fresh = toy()
    before = {n: p for n, p in fresh.named_parameters()}
    with pytest.raises(AdapterFileError, match="NaN"):
        peftspec.load_adapter(fresh, bad)
    after = dict(fresh.named_parameters())
    assert all(after[n] is p for n, p in before.items())  # the very float tensors
    assert not frozen_modules(fresh) and not peftspec.is_patched(fresh)


def test_import_peftspec_does_not_import_torchao_and_its_noise_stays_off_the_terminal():
    """One interpreter: peftspec, its plugins and registry import no torchao; then
    transformers (which imports torchao on its own whenever it is installed) prints
    none of torchao's kernel-loading lines."""
    code = ("import sys, peftspec, peftspec.core.packed, peftspec_plugins.quant; "
            "reg = peftspec.build_registry(); assert 'nf4' in reg.methods; "
            "print('torchao' in sys.modules); "
            "import transformers; from transformers import LlamaForCausalLM; "
            "import importlib.util as u; print(u.find_spec('torchao') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    imported, installed = out.stdout.split()
    assert imported == "False"
    if installed == "True":
        assert "Failed to load" not in out.stderr and "Enum subclass" not in out.stderr, \
            out.stderr


def test_large_weights_multiply_a_slice_of_rows_at_a_time(method, monkeypatch):
    """Above CHUNK_ELEMENTS a weight is dequantized rows r0:r1 at a time (a small,
    reused buffer): the slices are the whole dequantization bit for bit, and the
    products and input gradients equal the whole-weight path's."""
    import peftspec.core.packed as frozen

    frozen.release_scratch()  # what earlier tests left in this thread's buffers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=True))
    extra = "block_size = 16\nscaler_block_size = 2" if method == "nf4" else ""
    peftspec.apply_plan(peftspec.compile_plan(spec(method, extra, modules='["0"]'), model),
                        model)
    w = model[0].weight
    x = torch.randn(5, 64, requires_grad=True)
    whole = model(x)
    whole.square().sum().backward()
    g_whole = x.grad.clone()
    monkeypatch.setattr(frozen, "CHUNK_ELEMENTS", 64 * 8)
    rows = frozen._row_chunk(w)
    assert rows is not None and rows < 96
    parts = [frozen._rows_dense(w, r, min(96, r + rows), torch.float32).clone()
             for r in range(0, 96, rows)]
    assert torch.equal(torch.cat(parts), w.dequantize())
    x.grad = None
    sliced = model(x)
    sliced.square().sum().backward()
    assert torch.allclose(sliced, whole, atol=1e-5)
    assert torch.allclose(x.grad, g_whole, atol=1e-4)
    # the float buffer: at most one slice more than the weight; nf4's int32 code
    # indices (one per code byte): two bytes a weight
    codes = 2 * 64 * 96 if method == "nf4" else 0
    assert frozen.scratch_bytes() <= 4 * rows * 64 + 4 * 64 * 96 + codes

    # LoRA adds its update to the sliced base output in place, on 2-D and 3-D inputs
    lora = nn.Sequential(nn.Linear(64, 96, bias=False))
    peftspec.apply(spec(method, extra, modules='["0"]', more=LORA.replace(
        '["**.attn.q", "**.mlp.2"]', '["0"]')), lora)
    for shape in ((5, 64), (2, 3, 64)):
        xs = torch.randn(*shape, requires_grad=True)
        out = lora(xs)
        out.square().sum().backward()
        monkeypatch.setattr(frozen, "CHUNK_ELEMENTS", 1 << 30)
        x_whole = xs.detach().clone().requires_grad_(True)
        ref = lora(x_whole)
        ref.square().sum().backward()
        monkeypatch.setattr(frozen, "CHUNK_ELEMENTS", 64 * 8)
        assert out.shape == (*shape[:-1], 96)
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(xs.grad, x_whole.grad, atol=1e-4)


def test_nf4_without_torchao_is_a_compile_error_saying_what_to_install(monkeypatch):
    import peftspec_plugins.quant as quant

    monkeypatch.setattr(quant, "_has_torchao", lambda: False)
    with pytest.raises(SpecError, match=r"pip install 'peftspec\[quant\]'"):
        peftspec.compile_plan(spec("nf4"), toy())
