"""Values kept between calls outside training (plugins/lora/kept.py): DoRA's
weight norm and plain LoRA's contiguous ``Bᵀ``. The same outputs as computing
them every call, and never a stale value after an optimizer step, an in-place
write, new tensors, a load of other factors, a copy, or in a per-row batch of
several DoRA adapters."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import peftspec
from peftspec.core.packed import dequantized
from peftspec.core.patching import state_of
from peftspec_plugins.lora import dora
from toymodels import ToyConfig, ToyNet

DORA = ('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.attn.q", "**.mlp.2"]\nr = 2\n'
        'dora = true\n')
NF4 = ('[[freeze]]\nmethod = "nf4"\nmodules = ["**.attn.q", "**.mlp.2"]\nblock_size = 16\n'
       'scaler_block_size = 1\n')


def toy():
    return ToyNet(ToyConfig(d=16, hidden=32)).eval()


def dora_model(seed=0, base="fp32"):
    """A toy model with one DoRA adapter whose factors all moved off their init."""
    model = toy()
    if base == "nf4":
        pytest.importorskip("torchao")
    text = (NF4 if base == "nf4" else "") + DORA
    peftspec.apply(peftspec.parse_spec(text), model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def layers(model):
    return [m for m in model.modules() if type(m).__name__ == "LoRALinear"]


def reference(layer, x):
    """The DoRA output from the formula, nothing kept: m·(W+sBA)/||W+sBA|| applied to x."""
    w = dequantized(layer.weight).float()
    new = w + layer.scale * (layer.lora_B @ layer.lora_A)
    return F.linear(x, new * (layer.lora_magnitude / new.norm(dim=1)).unsqueeze(1), layer.bias)


def counting(monkeypatch):
    calls = []
    real = dora._norm
    monkeypatch.setattr(dora, "_norm", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_kept_norm_gives_the_outputs_of_computing_it_each_call(base, monkeypatch):
    model = dora_model(base=base)
    x = torch.randint(0, 11, (2, 5))
    n = len(layers(model))
    calls = counting(monkeypatch)
    with torch.no_grad():
        first = model(x)
        assert len(calls) == n  # one per DoRA layer
        again = model(x)
        assert len(calls) == n  # kept: no product B·A, no dequantization
        for layer in layers(model):
            dora.forget(layer)
        fresh = model(x)
        assert len(calls) == 2 * n
    assert torch.equal(first, again) and torch.equal(first, fresh)
    h = torch.randn(3, 16)
    layer = layers(model)[0]
    with torch.no_grad():
        assert torch.allclose(layer(h), reference(layer, h), atol=1e-5)


def test_training_computes_it_each_step_and_eval_sees_every_step(monkeypatch):
    """Training mode with gradients: fresh each call. Evaluating between steps
    (eval mode, or no_grad in train mode) keeps it until the next step changes A, B."""
    model = dora_model()
    layer = layers(model)[0]
    opt = torch.optim.AdamW(peftspec.trainable_parameters(model).values(), lr=0.05)
    x, h = torch.randint(0, 11, (2, 5)), torch.randn(3, 16)
    n = len(layers(model))
    calls = counting(monkeypatch)
    for step in range(3):
        model.train()
        opt.zero_grad()
        model(x).square().mean().backward()
        assert len(calls) == (n + 1) * step + n  # every layer, afresh
        opt.step()
        with torch.no_grad():  # train mode, gradients off: the new factors
            assert torch.allclose(layer(h), reference(layer, h), atol=1e-5), step
        model.eval()
        with torch.no_grad():
            assert torch.allclose(layer(h), reference(layer, h), atol=1e-5), step
            layer(h)
        assert len(calls) == (n + 1) * (step + 1)  # once after the step, then kept


def test_writes_new_tensors_scale_and_loads_are_seen():
    model = dora_model()
    layer = layers(model)[0]
    h = torch.randn(3, 16)

    def check(what):
        with torch.no_grad():
            assert torch.allclose(layer(h), reference(layer, h), atol=1e-5), what
            layer(h)  # and again, from the kept norm
            assert torch.allclose(layer(h), reference(layer, h), atol=1e-5), what

    check("first")
    with torch.no_grad():
        layer.lora_B.add_(0.5)
    check("in-place write to B")
    with torch.no_grad():
        layer.weight.mul_(1.5)
    check("in-place write to the base weight")
    layer._parameters["lora_A"] = torch.nn.Parameter(torch.randn_like(layer.lora_A))
    check("a new A")
    layer.lora_B.data = torch.randn_like(layer.lora_B)
    check("B's memory swapped")
    vars(layer)["scale"] = layer.scale * 3
    check("another scale")
    other = {k: torch.randn_like(v) for k, v in layer.adapter_params().items()}
    layer.load_adapter_state(other)
    check("load_adapter_state")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kept = layer(h)
        dora.forget(layer)
        assert torch.equal(kept, layer(h))  # autocast keeps a norm of its own


def test_a_different_adapter_file_loaded_under_the_same_name(tmp_path):
    x = torch.randint(0, 11, (2, 5))
    outs = {}
    for seed in (1, 2):
        single = dora_model(seed)
        peftspec.save_adapter(single, tmp_path / f"{seed}.safetensors")
        with torch.no_grad():
            outs[seed] = single(x)
    model = toy()
    peftspec.load_adapter(model, tmp_path / "1.safetensors", name="a")
    with torch.no_grad():
        assert torch.allclose(model(x), outs[1], atol=1e-5)
        peftspec.remove(model, "a")
        peftspec.load_adapter(model, tmp_path / "2.safetensors", name="a")
        assert torch.allclose(model(x), outs[2], atol=1e-5)
        # the same modules, other factors copied in (as a reload does)
        loaded = layers(model)
        for layer, src in zip(loaded, layers(dora_model(1))):
            layer.load_adapter_state(src.adapter_params())
        assert torch.allclose(model(x), outs[1], atol=1e-5)


def test_rows_of_two_dora_adapters_match_each_alone(tmp_path):
    model = toy()
    for name, seed in (("a", 1), ("b", 2)):
        peftspec.save_adapter(dora_model(seed), tmp_path / f"{name}.safetensors")
        peftspec.load_adapter(model, tmp_path / f"{name}.safetensors", name=name)
    names = ["a", "b", None, "a"]
    ids = torch.randint(0, 11, (len(names), 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(2):  # the second time from the kept norms
            with peftspec.rows(model, names):
                together = model(ids)
            for i, name in enumerate(names):
                with peftspec.using(model, name):
                    alone = model(ids[i:i + 1])
                assert torch.allclose(together[i:i + 1], alone, atol=1e-5), (i, name)
        # a step on one adapter's factors: its rows change, the other's are the same
        layer_b = state_of(model).adapters["b"].records[0].installed
        layer_b.lora_B.add_(0.25)
        with peftspec.rows(model, names):
            after = model(ids)
        assert torch.equal(after[0], together[0]) and not torch.equal(after[1], together[1])
        with peftspec.using(model, "b"):
            assert torch.allclose(after[1:2], model(ids[1:2]), atol=1e-5)


LORA = '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.attn.q", "**.mlp.2"]\nr = 2\n'


def lora_layer():
    model = toy()
    peftspec.apply(peftspec.parse_spec(LORA), model)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), layers(model)[0]


def lora_reference(layer, x):
    return F.linear(x, layer.weight + layer.scale * layer.lora_B @ layer.lora_A, layer.bias)


def test_lora_keeps_b_transposed_only_without_gradients_and_follows_every_change():
    model, layer = lora_layer()
    h = torch.randn(1, 16)

    def check(what):
        with torch.no_grad():
            for _ in range(2):  # computed, then kept
                assert torch.allclose(layer(h), lora_reference(layer, h), atol=1e-5), what
        assert "b_t" in vars(layer)["_kept"], what

    check("first")
    with torch.no_grad():
        layer.lora_B.mul_(-2)
    check("in-place write")
    opt = torch.optim.AdamW(peftspec.trainable_parameters(model).values(), lr=0.1)
    model.train()
    opt.zero_grad()
    layer(h).square().sum().backward()  # with gradients: B itself, so B gets its gradient
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    opt.step()
    model.eval()
    check("optimizer step")
    layer.load_adapter_state({k: torch.randn_like(v) for k, v in layer.adapter_params().items()})
    check("load_adapter_state")
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not vars(clone).get("_kept")  # copies carry nothing kept
        with torch.no_grad():
            clone.lora_B.add_(1.0)
            assert torch.allclose(clone(h), lora_reference(clone, h), atol=1e-5)
    check("after copies")
