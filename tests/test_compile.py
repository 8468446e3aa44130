"""A packed frozen base under torch.compile (issue 25, point 4).

``PackedWeight`` follows torch's wrapper-subclass protocol: every key that
``__tensor_flatten__`` returns is an attribute holding that inner tensor, and
``__tensor_unflatten__`` rebuilds an equal weight from them (what
torch.compile, FSDP2 and pytree tools rely on). A model with an nf4, an int8
and a bf16 frozen base and LoRA beside them runs under ``torch.compile``
(inductor, CPU) with the eager model's outputs and gradients."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import peftspec
from peftspec.core.packed import PackedWeight, is_packed

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="nf4 needs torchao (peftspec[quant])")

SPEC = '''
[[freeze]]
method = "nf4"
modules = ["**.mlp.gate_proj", "**.mlp.up_proj"]
scaler_block_size = 32
[[freeze]]
method = "int8"
modules = ["**.self_attn.q_proj", "**.self_attn.k_proj"]
[[freeze]]
method = "bf16"
modules = ["**.self_attn.v_proj", "**.mlp.down_proj"]
[[reparameterize]]
method = "lora"
modules = ["**.q_proj", "**.v_proj", "**.down_proj", "**.up_proj"]
r = 4
'''


def _model():
    import hf_tiny

    torch.manual_seed(0)
    model = peftspec.apply(peftspec.parse_spec(SPEC), hf_tiny.llama())
    with torch.no_grad():
        for name, p in peftspec.adapter_params(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _packed(model):
    return [p for p in model.parameters() if is_packed(p)]


@needs_torchao
def test_flatten_keys_are_attributes_and_unflatten_rebuilds():
    weights = _packed(_model())
    assert {w.codec.name for w in weights} == {"nf4", "int8", "bf16"}
    for w in weights:
        names, ctx = w.__tensor_flatten__()
        inner = {n: getattr(w, n) for n in names}  # the protocol's own access
        assert all(isinstance(t, torch.Tensor) for t in inner.values())
        back = PackedWeight.__tensor_unflatten__(inner, ctx, w.shape, w.stride())
        assert back.same_storage_format(w)
        assert torch.equal(back.dequantize(), w.dequantize())
        flat, spec = torch.utils._pytree.tree_flatten(w)
        assert flat[0] is w and spec is not None


@pytest.mark.slow
@needs_torchao
def test_torch_compile_equals_eager():
    """Inductor on CPU: the compiled model's logits are the eager model's
    (float32 rounding), and the frozen bytes are untouched. (Inference only: a
    compiled backward doubles the test's half minute of compile time.)"""
    model = _model().eval()
    before = [{k: v.clone() for k, v in w.stored.items()} for w in _packed(model)]
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=x).logits
        compiled = torch.compile(model, backend="inductor")(input_ids=x).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for w, was in zip(_packed(model), before):
        assert all(torch.equal(w.stored[k], v) for k, v in was.items())
