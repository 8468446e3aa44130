"""A streamed merge (`peftspec merge --model hf:DIR`) of an adapter whose modules
hold persistent buffers folds the saved buffers, not ones apply drew again; a
plugin's exception in a streamed merge names the plugin (issue 27, points 4, 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftspec
from peftspec.merging.stream import merge_to_dir
from test_promise import Good, plugin

transformers = pytest.importorskip("transformers")

from hf_tiny import llama  # noqa: E402


class Scaled(nn.Module):
    """``W x * (1 + vec * basis)``; ``basis`` a random persistent buffer."""

    def __init__(self, base):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.vec = nn.Parameter(torch.zeros(base.out_features))
        self.register_buffer("basis", torch.randn(base.out_features))

    def adapter_params(self):
        return {"vec": self.vec}

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * (1 + self.vec * self.basis)


class ScaledBasis(Good):
    name = "scaled-basis"

    def apply(self, module, step):
        return Scaled(module)

    def merge(self, installed, original):
        with torch.no_grad():
            original.weight.mul_((1 + installed.vec * installed.basis)[:, None])
        return original


class MergeBug(ScaledBasis):
    name = "merge-bug"

    def merge(self, installed, original):
        raise RuntimeError("merge broke")


REG = peftspec.build_registry(autoload=False, plugins=[plugin(ScaledBasis(), MergeBug())])
SPEC = '[[augment]]\nmethod = "{}"\nmodules = ["**.q_proj"]\n'


def _adapter(tmp_path, name):
    base_dir = tmp_path / "base"
    llama().save_pretrained(base_dir, max_shard_size="20KB")
    model = llama()
    peftspec.apply(peftspec.parse_spec(SPEC.format(name), registry=REG), model, registry=REG)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.normal_()
    adapter = peftspec.save_adapter(model, tmp_path / "a.safetensors")
    return base_dir, adapter, model


def test_a_streamed_merge_folds_the_saved_buffers(tmp_path):
    base_dir, adapter, adapted = _adapter(tmp_path, "scaled-basis")
    torch.manual_seed(99)  # the merge's apply draws another basis: the file's must win
    merge_to_dir(f"hf:{base_dir}", adapter, tmp_path / "merged", registry=REG)
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)


def test_a_plugins_exception_in_a_streamed_merge_is_named(tmp_path):
    base_dir, adapter, _ = _adapter(tmp_path, "merge-bug")
    with pytest.raises(peftspec.PluginError) as exc:
        merge_to_dir(f"hf:{base_dir}", adapter, tmp_path / "merged", registry=REG)
    msg = str(exc.value)
    assert "plugin 'peftspec-broken', method 'merge-bug' (augment[0]" in msg
    assert "(embedded spec):1) failed in merge on 'model.layers.0.self_attn.q_proj'" in msg
    assert "merge broke" in msg and exc.value.exit_code == 3
    assert not (tmp_path / "merged").exists()
