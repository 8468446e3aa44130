"""The shortcuts that make ``apply`` fast on thousands of modules behave as the slow
paths they replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftspec
from peftspec.core import fastmodule as _fastmodule
from peftspec.core.fastmodule import all_modules, init_module
from peftspec.core.patching import set_child
from peftspec_plugins.lora import LoRALinear, LoRAOptions, kaiming_bound as _kaiming_bound


class Fast(nn.Module):
    def __init__(self):
        init_module(self)


def test_the_tested_torch_takes_init_modules_unrolled_branch():
    assert _fastmodule._KNOWN_LAYOUT  # else the test below covers only the loop


@pytest.mark.parametrize("unrolled", [True, False])
def test_init_module_equals_nn_module_init(unrolled, monkeypatch):
    monkeypatch.setattr(_fastmodule, "_KNOWN_LAYOUT", unrolled and _fastmodule._KNOWN_LAYOUT)
    a, b, ref = Fast(), Fast(), nn.Module()
    assert vars(a) == vars(ref)
    assert list(vars(a)) == list(vars(ref))  # the same order, as torch's own
    assert {k: type(v) for k, v in vars(a).items()} == {k: type(v) for k, v in vars(ref).items()}
    for key, value in vars(a).items():  # fresh containers, never shared between modules
        if isinstance(value, (dict, set)):
            assert value is not vars(b)[key], key
    a.lin = nn.Linear(2, 3)  # behaves as a module: children, hooks, state dict
    calls = []
    a.register_forward_hook(lambda *args: calls.append(1))
    a.forward = lambda x: a.lin(x)
    a(torch.zeros(1, 2))
    assert calls == [1] and not b._forward_hooks
    assert set(a.state_dict()) == {"lin.weight", "lin.bias"}


def test_lora_init_draws_as_kaiming_uniform():
    lin = nn.Linear(24, 10)
    torch.manual_seed(3)
    module = LoRALinear(lin, "linear", LoRAOptions(modules=("x",), r=4))
    expected = torch.empty(4, 24)
    torch.manual_seed(3)
    nn.init.kaiming_uniform_(expected, a=5 ** 0.5)
    assert torch.equal(module.lora_A, expected)
    assert _kaiming_bound(24) > 0
    assert module.adapter_params() == {"lora_A": module.lora_A, "lora_B": module.lora_B}


def test_all_modules_is_model_modules_as_a_set():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), shared, nn.ModuleList([shared]))
    model.add_module("none", None)
    assert {id(m) for m in all_modules(model)} == {id(m) for m in model.modules()}
    assert len(all_modules(model)) == len(list(model.modules()))


def test_set_child_honours_custom_setattr_and_registration_hooks():
    seen = []

    class Watching(nn.Module):
        def __init__(self):
            super().__init__()
            self.child = nn.Linear(2, 2)

        def __setattr__(self, name, value):
            seen.append(name)
            super().__setattr__(name, value)

    parent = Watching()
    seen.clear()
    set_child(parent, "child", nn.Identity())
    assert seen == ["child"] and isinstance(parent.child, nn.Identity)

    registered = []
    handle = nn.modules.module.register_module_module_registration_hook(
        lambda module, name, sub: registered.append(name))
    try:
        plain = nn.Sequential(nn.Linear(2, 2))
        registered.clear()
        set_child(plain, "0", nn.Identity())
        assert registered == ["0"]
    finally:
        handle.remove()
    plain = nn.Sequential(nn.Linear(2, 2))
    set_child(plain, "0", nn.Identity())
    assert isinstance(plain[0], nn.Identity)


def test_apply_trains_exactly_the_adapter():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    spec = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\nmodules = ["0"]\nr = 2\n'
                               '[[train]]\nparams = ["1.bias"]\n')
    peftspec.apply(spec, model)
    assert set(peftspec.trainable_parameters(model)) == {"0.lora_A", "0.lora_B", "1.bias"}


def test_apply_takes_the_fast_paths_on_the_installed_transformers(monkeypatch):
    """On the transformers installed (CI runs the oldest and the newest admitted),
    LoRA's modules are built without ``nn.Module.__init__`` and swapped in without
    ``setattr``: if a release adds a module-registration hook or a custom
    ``__setattr__``, apply falls back to the slow paths (3x slower on thousands of
    targets) and this test says so, where a benchmark would only be noisy."""
    import pytest

    transformers = pytest.importorskip("transformers")
    from peftspec.core import patching

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=64)
    gpt2 = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64,
                                   n_positions=32)
    for model, modules in ((transformers.LlamaForCausalLM(cfg), '["type:Linear"]\nexclude = '
                            '["lm_head"]'), (transformers.GPT2LMHeadModel(gpt2), '["**.c_attn"]')):
        spec = peftspec.parse_spec(f'[[reparameterize]]\nmethod = "lora"\nmodules = {modules}\n'
                                   'r = 2\n')
        inits, setattrs = [], []
        real_init = nn.Module.__init__

        def counting_init(self, *args, **kwargs):
            inits.append(type(self).__name__)
            real_init(self, *args, **kwargs)

        def counting_setattr(obj, name, value):
            setattrs.append(f"{type(obj).__name__}.{name}")
            setattr(obj, name, value)

        monkeypatch.setattr(nn.Module, "__init__", counting_init)
        monkeypatch.setattr(patching, "setattr", counting_setattr, raising=False)
        plan = peftspec.compile_plan(spec, model)
        peftspec.apply_plan(plan, model)
        monkeypatch.undo()
        assert len(plan.steps) >= 3
        assert not inits, f"nn.Module.__init__ ran for {sorted(set(inits))}"
        assert not setattrs, f"slow child swap for {setattrs[:3]}"
