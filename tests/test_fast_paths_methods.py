"""The shortcuts of issue 14's performance work behave as the slow paths they replace:
the compiler's model walk, digest and selector index, the paused garbage collector,
the Parameter helper, and IA3's and VeRA's in-place inference forwards."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import peftspec
from peftspec.core.fastmodule import gc_paused, parameter
from peftspec.core.fingerprint import digest, fingerprint, named_tensors, tensors_digest
from peftspec.core.model_walk import walk as _walk
from peftspec.core.resolve import ModuleTypes as _Types, by_leaf as _by_leaf, resolve_all as _resolve_all
from peftspec.core.spec import Rule
from toymodels import ToyConfig, ToyNet


def _shared_model() -> nn.Module:
    """Nested, with a module at two paths, a None child, a tied weight and a buffer."""
    model = ToyNet(ToyConfig(n_blocks=3, tied=True))
    model.blocks[2].attn["o"] = model.blocks[0].attn["o"]  # one module, two paths
    model.blocks[1].register_module("gone", None)
    model.blocks[1].register_buffer("none_buffer", None)
    return model


def _first_name_is_the_deep_one() -> nn.Module:
    """A module that is the root's second child and also inside its first: torch
    names it under the first child (pre-order), not under the root."""
    shared = nn.Linear(2, 2)
    shared.register_buffer("scale", torch.ones(2))
    model = nn.Module()
    model.first = nn.Sequential(nn.ReLU(), shared)
    model.second = shared
    model.third = nn.ModuleDict({"again": model.first})
    model._modules["odd.name"] = nn.Linear(2, 2)  # put in by hand: a dot in its name
    return model


@pytest.mark.parametrize("build", [_shared_model, _first_name_is_the_deep_one])
def test_named_modules_and_tensors_equal_torchs_walks(build):
    model = build()
    leaves = {}
    ours, params, buffers = _walk(model, leaves)
    ref = dict(model.named_modules())
    assert leaves["modules"] == _by_leaf(ref)
    assert list(ours) == list(ref) and all(ours[k] is ref[k] for k in ref)
    assert list(params) == list(dict(model.named_parameters()))
    assert all(params[k] is v for k, v in model.named_parameters())
    assert list(buffers) == list(dict(model.named_buffers()))
    assert all(buffers[k] is v for k, v in model.named_buffers())
    assert (params, buffers) == named_tensors(model, ours)
    assert tensors_digest((params, buffers)) == digest(fingerprint(model))


def test_named_modules_defers_to_an_override():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

        def named_modules(self, *args, **kwargs):
            yield "", self
            yield "renamed", self.a

    modules, params, _ = _walk(Odd())
    assert list(modules) == ["", "renamed"] and list(params) == ["renamed.weight", "renamed.bias"]


def test_digest_changes_with_a_shape_or_name():
    a = ToyNet(ToyConfig())
    b = ToyNet(ToyConfig(hidden=13))
    assert tensors_digest(named_tensors(a)) != tensors_digest(named_tensors(b))


_ATOMS = st.sampled_from(["q", "o", "mlp", "attn", "0", "2", "x"])
_NAMES = st.lists(st.lists(_ATOMS, min_size=1, max_size=4).map(".".join), min_size=1,
                  max_size=30, unique=True)
_SELECTORS = st.one_of(
    st.lists(_ATOMS, min_size=1, max_size=2).map(lambda a: "**." + ".".join(a)),
    st.lists(_ATOMS, min_size=1, max_size=2).map(lambda a: ".".join(a) + ".**"),
    st.lists(_ATOMS, min_size=1, max_size=3).map(".".join),
    st.just("**.*"), st.just("re:.*q"))


@settings(deadline=None, max_examples=150)
@given(names=_NAMES, selectors=st.lists(_SELECTORS, min_size=1, max_size=4))
def test_leaf_index_resolves_as_a_full_scan(names, selectors):
    """``**.name`` selectors go through the leaf index; every other kind scans: both
    must pick exactly the names ``Selector.matches`` picks, in any case."""
    modules = {"": None, **{n: None for n in names}}
    rule = Rule(family="reparameterize", index=0, method="lora", options=None, exclude=(),
                optional=True, line=1)
    types = _Types({n: nn.Identity() for n in modules}, {})
    problems = []
    fast = _resolve_all(rule, "modules", selectors, "modules", modules, types, {},
                        lambda *a, **k: problems.append(a), {})
    slow = _resolve_all(rule, "modules", selectors, "modules", modules, types, {},
                        lambda *a, **k: problems.append(a), None)
    assert fast == slow
    from peftspec.core.matching import parse_selector
    assert fast == {n for n in names for s in selectors if parse_selector(s).matches(n)}
    assert not problems  # optional rule: no "matched nothing" problems
    index = _by_leaf(modules)
    assert sorted(n for group in index.values() for n in group) == sorted(names)


def test_type_selectors_still_read_class_names():
    model = ToyNet(ToyConfig())
    spec = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\nmodules = ["type:Linear"]'
                               '\nexclude = ["head"]\n')
    targets = [s.target for s in peftspec.compile_plan(spec, model).steps]
    assert targets == [n for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and n != "head"]


def test_gc_paused_restores_the_collector():
    calls = []

    @gc_paused
    def body(fail=False):
        calls.append(gc.isenabled())
        if fail:
            raise ValueError("boom")
        return 7

    assert gc.isenabled()
    assert body() == 7 and calls == [False] and gc.isenabled()
    with pytest.raises(ValueError):
        body(fail=True)
    assert gc.isenabled()
    gc.disable()
    try:  # paused already: left paused
        body()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_parameter_equals_nn_parameter():
    t = torch.randn(3, 4)
    p, ref = parameter(t), nn.Parameter(t)
    assert type(p) is nn.Parameter and p.requires_grad and torch.equal(p, ref)
    assert p.data_ptr() == t.data_ptr()  # no copy, as nn.Parameter

    class Sub(torch.Tensor):
        pass

    sub = t.as_subclass(Sub)  # anything but a plain tensor: nn.Parameter's own path
    assert type(parameter(sub)) is type(nn.Parameter(sub)) and parameter(sub).requires_grad


def _gpt2_tiny():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("rule", [
    '[[augment]]\nmethod = "ia3"\nmodules = ["**.c_attn", "**.c_fc", "**.c_proj"]\n',
    '[[augment]]\nmethod = "ia3"\nmodules = ["**.c_attn", "**.mlp.c_proj"]\n'
    'feedforward = ["**.mlp.c_proj"]\n',
    '[[reparameterize]]\nmethod = "vera"\nmodules = ["**.c_attn", "**.c_fc"]\nr = 8\n',
])
def test_inference_forward_equals_the_training_forward(rule):
    """Under no_grad IA3 and VeRA compute in place; the bits must be those of the
    out-of-place path autograd takes, with trained (non-initial) values, and the
    training path must still give gradients."""
    model = peftspec.apply(peftspec.parse_spec(rule), _gpt2_tiny())
    with torch.no_grad():
        for p in peftspec.adapter_params(model).values():
            p.uniform_(-1.0, 2.0)
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        fast = model(x).logits
    slow = model(x).logits  # grad enabled, adapter requires grad: out-of-place
    assert torch.equal(fast, slow)
    slow.sum().backward()
    grads = [p.grad for p in peftspec.adapter_params(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_vera_adapt_equals_the_old_formula():
    """adapt() may overwrite the base output it is given (per-row batches hand it a
    copy); the result is the old formula's value bit for bit."""
    model = peftspec.apply(peftspec.parse_spec(
        '[[reparameterize]]\nmethod = "vera"\nmodules = ["**.c_fc"]\nr = 8\n'), _gpt2_tiny())
    module = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        for p in module.adapter_params().values():
            p.uniform_(-1.0, 2.0)
        x = torch.randn(2, 5, module.in_features)
        base = module._base(x)
        proj = module.projections
        a = proj.vera_A[:, :module.in_features]
        b = proj.vera_B[:module.out_features, :]
        expected = base + module.vera_lambda_b * torch.nn.functional.linear(
            module.vera_lambda_d * torch.nn.functional.linear(x, a), b)
        assert torch.equal(module.adapt(x, base.clone()), expected)


def test_compiler_steps_equal_dataclass_steps():
    from dataclasses import fields

    from peftspec.core.step import Step, new_step as _step

    args = ("blocks.0.attn.q", "lora", "reparameterize", object(), ("modules",),
            "reparameterize[0]", 3)
    ours, ref = _step(*args), Step(*args)
    assert ours == ref and vars(ours) == vars(ref)
    assert list(vars(ours)) == [f.name for f in fields(Step)]  # every field, in order
    assert hash(ours) == hash(ref)


def test_base_bytes_fast_path_equals_the_general_loop():
    from peftspec.core.model_walk import base_bytes as _base_bytes

    model = ToyNet(ToyConfig(n_blocks=2))
    model.blocks[0].attn["o"].to(torch.float16)  # two dtypes: bytes are per element size
    params = dict(model.named_parameters())
    fast = _base_bytes(params, {})
    general = _base_bytes(params, {"no.such.module": (0, 0)})  # takes the per-name loop
    n = sum(p.numel() for p in params.values())
    dense = sum(p.numel() * p.element_size() for p in params.values())
    assert fast == general == (n, dense, dense)
    assert dense < 4 * n  # the float16 module counts two bytes an element
