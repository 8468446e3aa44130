"""Several named adapters on one base: load, use, disabled, remove, train."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import peftspec
from peftspec.models.nanogpt import GPT, GPTConfig

SPECS = {
    "lora_bitfit": """
        [[train]]
        params = ["**.ln1.bias"]
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj", "**.v_proj"]
        r = 4
    """,
    "dora_adapter": """
        [[train]]
        params = ["**.ln1.bias", "ln_f.weight"]
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj"]
        dora = true
        [[augment]]
        method = "bottleneck"
        after = ["**.mlp"]
        size = 4
    """,
    "prompt": """
        [prefix]
        method = "prompt-tuning"
        tokens = 3
    """,
    "prefix": """
        [prefix]
        method = "prefix-tuning"
        tokens = 2
    """,
}


def base():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


IDS = torch.randint(0, 257, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        out = model(IDS).logits
    return out[:, -IDS.shape[1]:]  # soft prompts add leading positions


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each spec applied to its own base, perturbed, saved; with its reference output."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, text) in enumerate(SPECS.items()):
        model = base()
        peftspec.apply(peftspec.parse_spec(textwrap.dedent(text)), model)
        perturb(model, i)
        path = root / f"{name}.safetensors"
        peftspec.save_adapter(model, path)
        out[name] = (path, logits(model))
    return out


def frozen_snapshot(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


def test_load_use_disable_remove(files):
    model = base()
    reference = logits(model)
    snap = frozen_snapshot(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    for name, (path, _) in files.items():
        peftspec.load_adapter(model, path, name=name)
    assert peftspec.adapter_names(model) == list(SPECS)
    assert peftspec.active_adapter(model) == "lora_bitfit"  # the first one loaded
    for name, (_, expected) in files.items():
        peftspec.use(model, name)
        assert torch.equal(logits(model), expected), name
        with peftspec.disabled(model):
            assert torch.equal(logits(model), reference)
        assert peftspec.active_adapter(model) == name
    peftspec.use(model, None)
    assert torch.equal(logits(model), reference)
    # switching copied no frozen weight: same objects, same storage, same bits
    for n, (p, value) in snap.items():
        now = dict(model.named_parameters())[n]
        assert now is p and now.data_ptr() == ptrs[n]
        assert torch.equal(now, value), n
    peftspec.remove(model, "dora_adapter")
    assert "dora_adapter" not in peftspec.adapter_names(model)
    peftspec.use(model, "prompt")
    assert torch.equal(logits(model), files["prompt"][1])
    peftspec.remove(model)
    assert not peftspec.is_patched(model)
    assert torch.equal(logits(model), reference)
    assert all(torch.equal(p, snap[n][1]) for n, p in model.named_parameters())


def test_loading_beside_keeps_the_active_adapter(files):
    model = base()
    peftspec.load_adapter(model, files["prompt"][0], name="p")
    peftspec.load_adapter(model, files["lora_bitfit"][0], name="l")
    assert peftspec.active_adapter(model) == "p"
    assert torch.equal(logits(model), files["prompt"][1])
    peftspec.load_adapter(model, files["prefix"][0], name="x", activate=True)
    assert peftspec.active_adapter(model) == "x"
    with pytest.raises(peftspec.PeftspecError, match="already loaded"):
        peftspec.load_adapter(model, files["prefix"][0], name="x")
    with pytest.raises(peftspec.PeftspecError, match="no adapter named 'nope'"):
        peftspec.use(model, "nope")


def test_failed_load_beside_others_changes_nothing(files, tmp_path):
    model = base()
    peftspec.load_adapter(model, files["lora_bitfit"][0], name="a")
    before = logits(model)
    bad = tmp_path / "bad.safetensors"
    data = bytearray(files["dora_adapter"][0].read_bytes())
    bad.write_bytes(bytes(data[: len(data) - 10]))
    with pytest.raises(peftspec.AdapterFileError):
        peftspec.load_adapter(model, bad, name="b")
    assert peftspec.adapter_names(model) == ["a"] and peftspec.active_adapter(model) == "a"
    assert torch.equal(logits(model), before)


def test_save_a_named_adapter(files, tmp_path):
    model = base()
    for name, (path, _) in files.items():
        peftspec.load_adapter(model, path, name=name)
    out = tmp_path / "again.safetensors"
    peftspec.save_adapter(model, out, name="dora_adapter")
    assert peftspec.active_adapter(model) == "lora_bitfit"
    fresh = base()
    peftspec.load_adapter(fresh, out)
    assert torch.equal(logits(fresh), files["dora_adapter"][1])


OPS = st.lists(st.tuples(st.sampled_from(["load", "use", "base", "disabled", "remove",
                                          "train"]),
                         st.sampled_from(list(SPECS))), min_size=1, max_size=12)


@given(ops=OPS)
def test_random_sequences_keep_frozen_weights_bit_identical(files, ops):
    model = base()
    reference = logits(model)
    snap = frozen_snapshot(model)
    # base tensors some adapter's [[train]] rule trains: they hold that adapter's
    # values while it is active, and the base values otherwise
    trained_somewhere = {n for n in snap if n.endswith("ln1.bias") or n == "ln_f.weight"}

    def assert_base_values():
        for n, p in model.named_parameters():
            assert torch.equal(p, snap[n][1]), n
    expected: dict[str, torch.Tensor] = {}  # adapter -> its outputs when last active
    for op, name in ops:
        loaded = peftspec.adapter_names(model)
        if op == "load" and name not in loaded:
            peftspec.load_adapter(model, files[name][0], name=name)
            expected[name] = files[name][1]
        elif op == "use" and name in loaded:
            peftspec.use(model, name)
            assert torch.equal(logits(model), expected[name])
        elif op == "base" and loaded:
            peftspec.use(model, None)
            assert torch.equal(logits(model), reference)
            assert_base_values()
        elif op == "disabled" and loaded:
            with peftspec.disabled(model):
                assert torch.equal(logits(model), reference)
                assert_base_values()
        elif op == "remove" and name in loaded:
            peftspec.remove(model, name)
            expected.pop(name)
        elif op == "train" and peftspec.active_adapter(model):
            active = peftspec.active_adapter(model)
            params = peftspec.trainable_parameters(model)
            assert not (set(params) & set(snap)) - trained_somewhere
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            loss = model(IDS, labels=IDS).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            expected[active] = logits(model)
        for n, p in model.named_parameters():
            if n in snap and n not in trained_somewhere:
                assert p is snap[n][0] and torch.equal(p, snap[n][1]), n
    if peftspec.is_patched(model):
        peftspec.remove(model)
    assert torch.equal(logits(model), reference)
    for n, p in model.named_parameters():
        assert p is snap[n][0] and torch.equal(p, snap[n][1]), n
