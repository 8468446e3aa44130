"""Invariants, over random small models and random valid specs.

(a) frozen tensors stay bit-identical through apply and AdamW training with
    weight decay, every parameter handed to the optimizer;
(b) zero-init LoRA, DoRA and bottleneck adapters leave outputs exactly unchanged;
(c) save -> load round-trips bit-exactly;
(d) remove restores the original modules with bit-identical weights;
(e) compiling a spec twice gives the same plan.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import peftspec
from toymodels import MODULE_SELECTORS, PARAM_SELECTORS, ToyConfig, ToyNet


@st.composite
def configs(draw):
    return ToyConfig(vocab=draw(st.integers(5, 20)), d=draw(st.integers(2, 12)),
                     hidden=draw(st.integers(2, 16)), n_blocks=draw(st.integers(1, 3)),
                     bias=draw(st.booleans()), tied=draw(st.booleans()),
                     seed=draw(st.integers(0, 2**16)))


@st.composite
def specs(draw, allow_train=True, allow_prefix=True):
    """TOML text of a valid spec for ToyNet: LoRA rules on disjoint modules, maybe a
    bottleneck adapter rule, maybe a soft prompt, maybe [[train]]."""
    names = list(MODULE_SELECTORS)
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    if "type:Linear" in chosen:
        chosen = ["type:Linear"] + [c for c in chosen if MODULE_SELECTORS[c]]
    groups = draw(st.integers(1, len(chosen)))
    lines = ["[spec]", 'name = "random"']
    for g in range(groups):
        mods = chosen[g::groups]
        if not mods:
            continue
        has_emb = any(MODULE_SELECTORS[m] for m in mods)
        lines += ["[[reparameterize]]", 'method = "lora"',
                  "modules = [" + ", ".join(f'"{m}"' for m in mods) + "]",
                  f"r = {draw(st.integers(1, 2))}",  # <= min(in, out): ToyConfig d >= 2
                  f"alpha = {draw(st.sampled_from([1, 2, 8, 16.5]))}",
                  f"rslora = {str(draw(st.booleans())).lower()}",
                  f"dora = {str(False if has_emb else draw(st.booleans())).lower()}",
                  f'init = "{draw(st.sampled_from(["zeros", "gaussian"]))}"',
                  "optional = true"]
    if draw(st.booleans()):
        where = draw(st.sampled_from(["after", "parallel_to"]))
        pool = ["**.attn.o", "**.mlp", "**.attn.q", "head"] if where == "after" else ["**.mlp"]
        mods = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
        lines += ["[[augment]]", 'method = "bottleneck"',
                  f"{where} = [" + ", ".join(f'"{m}"' for m in mods) + "]",
                  f"size = {draw(st.integers(1, 4))}",
                  f'activation = "{draw(st.sampled_from(["relu", "gelu", "silu", "tanh"]))}"',
                  f"layer_norm = {str(draw(st.booleans())).lower()}",
                  f"scaling = {draw(st.sampled_from([0.5, 1.0, 4.0]))}"]
    if allow_prefix and draw(st.booleans()):
        method = draw(st.sampled_from(["prompt-tuning", "p-tuning"]))
        lines += ["[prefix]", f'method = "{method}"', f"tokens = {draw(st.integers(1, 3))}"]
        if method == "prompt-tuning":
            lines.append(f'init = "{draw(st.sampled_from(["random", "vocab"]))}"')
        else:
            lines.append(f'encoder = "{draw(st.sampled_from(["mlp", "lstm"]))}"')
    if allow_train and draw(st.booleans()):
        params = draw(st.lists(st.sampled_from(PARAM_SELECTORS), min_size=1, max_size=2,
                               unique=True))
        lines += ["[[train]]", "params = [" + ", ".join(f'"{p}"' for p in params) + "]",
                  "optional = true"]
    return "\n".join(lines) + "\n"


def snapshot(model):
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) +
            list(model.named_buffers())}


def tokens(cfg, seed=0, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab, shape, generator=g)


def train_steps(model, cfg, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for i in range(steps):
        ids = tokens(cfg, seed=i)
        loss = model(ids).logsumexp(-1).mean() - model(ids).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def compiled(text, model):
    spec = peftspec.parse_spec(text, file="random.toml")
    return peftspec.compile_plan(spec, model)


@given(cfg=configs(), text=specs())
def test_frozen_tensors_bit_identical_through_training(cfg, text):
    model = ToyNet(cfg)
    before = snapshot(model)
    base_objects = {n: p for n, p in model.named_parameters()}
    peftspec.apply_plan(compiled(text, model), model)
    trainable = set(peftspec.trainable_parameters(model))
    adapter = set(peftspec.adapter_params(model))
    assert adapter <= trainable
    train_steps(model, cfg)
    after = dict(model.named_parameters())
    for name, value in before.items():
        if name in trainable:
            continue
        assert torch.equal(snapshot(model)[name], value), f"frozen tensor {name} changed"
        if name in base_objects:
            assert after[name] is base_objects[name], f"{name} is no longer the same object"
    # and training did reach the adapter: every B (or A for embeddings) moved off zero
    moved = [n for n, p in peftspec.adapter_params(model).items()
             if not torch.equal(p, before.get(n, torch.zeros_like(p)))]
    assert moved or not adapter


@given(cfg=configs(), text=specs(allow_train=False, allow_prefix=False),
       seed=st.integers(0, 100))
def test_zero_init_methods_leave_outputs_unchanged(cfg, text, seed):
    model = ToyNet(cfg).eval()
    ids = tokens(cfg, seed)
    with torch.no_grad():
        expected = model(ids)
        peftspec.apply_plan(compiled(text, model), model)
        got = model(ids)
    assert torch.equal(got, expected)


@given(cfg=configs(), text=specs())
def test_save_load_round_trip_is_bit_exact(cfg, text, tmp_path_factory):
    model = ToyNet(cfg)
    pristine = copy.deepcopy(model)
    peftspec.apply_plan(compiled(text, model), model)
    train_steps(model, cfg, steps=2)
    path = tmp_path_factory.mktemp("rt") / "a.safetensors"
    peftspec.save_adapter(model, path)
    peftspec.load_adapter(pristine, path)
    if "p-tuning" not in text:  # P-tuning saves its encoder's output, not the encoder
        saved = {n: p for n, p in model.state_dict().items()}
        loaded = pristine.state_dict()
        assert saved.keys() == loaded.keys()
        for n in saved:
            assert torch.equal(saved[n], loaded[n]), n
    ids = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), pristine.eval()(ids))


@given(cfg=configs(), text=specs())
def test_remove_restores_original_modules_bit_identical(cfg, text):
    model = ToyNet(cfg)
    before = snapshot(model)
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peftspec.apply_plan(compiled(text, model), model)
    train_steps(model, cfg, steps=2)
    peftspec.remove(model)
    assert not peftspec.is_patched(model)
    assert dict(model.named_modules()).keys() == modules.keys()
    for name, m in model.named_modules():
        assert m is modules[name], name
    after = snapshot(model)
    assert after.keys() == before.keys()
    for n in before:
        assert torch.equal(after[n], before[n]), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@given(cfg=configs(), text=specs())
def test_compiling_twice_gives_the_same_plan(cfg, text):
    model = ToyNet(cfg)
    a, b = compiled(text, model), compiled(text, model)
    assert a.steps == b.steps
    assert a.to_dict() == b.to_dict()
    # and an identical copy of the model gives the same plan too
    assert compiled(text, copy.deepcopy(model)).to_dict() == a.to_dict()


def test_apply_failure_rolls_back(tiny_gpt, registry, monkeypatch):
    """A method that raises half-way leaves the model exactly as it was."""
    spec = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n'
                               '[[train]]\nparams = ["**.bias"]\n', registry=registry)
    plan = peftspec.compile_plan(spec, tiny_gpt, registry=registry)
    before = snapshot(tiny_gpt)
    modules = dict(tiny_gpt.named_modules())
    lora = registry.method("lora")
    calls = []
    real_apply = type(lora).apply

    def flaky(self, module, step):
        calls.append(step.target)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_apply(self, module, step)

    monkeypatch.setattr(type(lora), "apply", flaky)
    with pytest.raises(peftspec.PluginError, match="boom") as exc:  # named (core.blame)
        peftspec.apply_plan(plan, tiny_gpt, registry=registry)
    assert isinstance(exc.value.__cause__, RuntimeError)
    assert not peftspec.is_patched(tiny_gpt)
    assert all(m is modules[n] for n, m in tiny_gpt.named_modules())
    assert all(torch.equal(t, before[n]) for n, t in snapshot(tiny_gpt).items())
    assert all(p.requires_grad for p in tiny_gpt.parameters())
