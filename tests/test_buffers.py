"""Buffers an adapter adds are adapter state (issue 27, point 6): a persistent
one is saved with the adapter and restored on load, a non-persistent one is
recomputed by apply; a buffer registered on a base module is refused at apply;
the conformance kit's ``buffers`` check holds a plugin to it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import peftspec
from peftspec.core.buffers import adapter_buffers
from peftspec.testing import check_method
from test_promise import Good, Wrapped, assert_unchanged, plugin, snapshot, tiny

RULE = '[[augment]]\nmethod = "{name}"\nmodules = ["**.v_proj"]\n'


class Buffered(Wrapped):
    """A Linear plus ``vec * basis``: ``basis`` fixed data, as a buffer."""

    def __init__(self, base, basis, persistent):
        super().__init__(base.weight, base.bias, base.out_features)
        self.register_buffer("basis", basis, persistent=persistent)

    def forward(self, x):
        return super().forward(x) + self.vec * self.basis


class Saved(Good):
    """A random basis, persistent: the file keeps it."""
    name = "saved-basis"

    def apply(self, module, step):
        return Buffered(module, torch.randn(module.out_features), True)


class Derived(Good):
    """A basis derived from the base weight, non-persistent: apply recomputes it."""
    name = "derived-basis"

    def apply(self, module, step):
        return Buffered(module, module.weight.detach().sum(1).cos(), False)


class Drawn(Good):
    """The fault: a random basis, not persistent, so a load draws another one."""
    name = "drawn-basis"

    def apply(self, module, step):
        return Buffered(module, torch.randn(module.out_features), False)


class OnTheBase(Good):
    """In place, with a buffer on the module it was given (a base module)."""
    name = "base-buffer"

    def count_params(self, module, step):
        return 0

    def apply(self, module, step):
        module.register_buffer("scratch", torch.zeros(3))
        return module


REG = peftspec.build_registry(autoload=False, plugins=[plugin(Saved(), Derived(), Drawn(),
                                                              OnTheBase())])
IDS = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))


def _trained(name):
    model = tiny()
    peftspec.apply(peftspec.parse_spec(RULE.format(name=name), registry=REG), model,
                   registry=REG)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.normal_()
    return model


@pytest.mark.parametrize("name, persistent", [("saved-basis", True), ("derived-basis", False)])
def test_buffers_round_trip_through_the_adapter_file(name, persistent, tmp_path):
    model = _trained(name)
    names = {f"blocks.{i}.attn.v_proj.basis" for i in range(2)}
    assert {n: p for n, (_, p) in adapter_buffers(model).items()} == dict.fromkeys(names,
                                                                                 persistent)
    with torch.no_grad():
        want = model(IDS).logits
    path = peftspec.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert (names <= set(f.keys())) == persistent and (names & set(f.keys())) == (
            names if persistent else set())
    torch.manual_seed(123)  # the load's apply draws other random numbers
    fresh = peftspec.load_adapter(tiny(), path, registry=REG)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, want)
    for n, (t, _) in adapter_buffers(model).items():
        assert torch.equal(adapter_buffers(fresh)[n][0], t)
    with peftspec.disabled(fresh):  # off: no adapter buffer left behind
        assert not names & {n for n, _ in fresh.named_buffers()}
    peftspec.remove(fresh)
    assert not names & set(fresh.state_dict())


def test_a_file_from_before_buffers_were_saved_still_loads(tmp_path):
    """An adapter without buffers writes and reads the same tensors as before."""
    model = tiny()
    spec = peftspec.parse_spec(RULE.format(name="lora").replace("augment", "reparameterize"))
    peftspec.apply(spec, model)
    path = peftspec.save_adapter(model, tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(peftspec.adapter_params(model))
    peftspec.load_adapter(tiny(), path)


def test_a_buffer_on_a_base_module_is_refused_at_apply():
    model = tiny()
    ids = IDS
    with torch.no_grad():
        out = model(ids).logits
    snap = snapshot(model)
    buffers = dict(model.named_buffers())
    spec = peftspec.parse_spec(RULE.format(name="base-buffer"), file="s.toml", registry=REG)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.apply(spec, model, registry=REG)
    msg = str(exc.value)
    assert "plugin 'peftspec-broken', method 'base-buffer' (augment[0], s.toml:1)" in msg
    assert "registered buffer 'blocks.0.attn.v_proj.scratch'" in msg
    assert "Register buffers on a module apply builds" in msg
    assert exc.value.exit_code == 3
    assert dict(model.named_buffers()) == buffers  # the buffer is gone again
    assert_unchanged(model, snap, ids, out)


@pytest.mark.parametrize("name, words", [
    ("saved-basis", "2 buffer(s): 2 persistent, saved"),
    ("derived-basis", "2 buffer(s): 0 persistent, saved; 2 non-persistent, recomputed"),
])
def test_the_kit_passes_buffers_that_round_trip(name, words):
    report = check_method(None, RULE.format(name=name), registry=REG, raise_on_failure=False)
    assert not report.failures, str(report)
    (result,) = [r for r in report.results if r.check == "buffers"]
    assert result.status == "passed" and words in result.detail


def test_the_kit_names_a_non_persistent_buffer_that_does_not_round_trip():
    report = check_method(None, RULE.format(name="drawn-basis"), registry=REG,
                          raise_on_failure=False)
    by_name = {r.check: r for r in report.results}
    assert by_name["buffers"].status == "failed"
    assert ("non-persistent buffer 'blocks.0.attn.v_proj.basis' differs after save and load"
            in by_name["buffers"].detail)
    assert "register it persistent" in by_name["buffers"].detail
    assert all("Error:" not in r.detail for r in report.results), str(report)


def test_the_kit_skips_buffers_for_an_adapter_without_any():
    report = check_method(None, RULE.format(name="lora").replace("augment", "reparameterize"),
                          raise_on_failure=False)
    assert report.status("buffers") == "skipped"
