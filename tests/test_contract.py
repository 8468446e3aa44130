"""The method contract: the required part, the optional capabilities as protocols,
and HF PEFT's format as codecs registered through their own hook."""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peftspec
from peftspec.core.capabilities import (CAPABILITIES, InitFromData, Mergeable, PerRow,
                                        SharesRuleState, Trains, capabilities_of)
from peftspec.formats.hf_peft import codec_for
from peftspec.plugin_api import HFPeftCodec, Method, hookimpl, selectors


@dataclass(frozen=True)
class ScaleOptions:
    modules: tuple[str, ...] = selectors()


class Scaled(nn.Module):
    """The base's own weight and bias (the same Parameters), its output scaled by s."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.s = nn.Parameter(torch.ones((), dtype=base.weight.dtype))

    def adapter_params(self):
        return {"s": self.s}

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias) * self.s


class Scale(Method):
    """The required contract only."""

    name = "scale"
    family = "reparameterize"
    Options = ScaleOptions
    unchanged_at_apply = True

    def check(self, module, step):
        return None if isinstance(module, nn.Linear) else "Linear only"

    def count_params(self, module, step):
        return 1

    def apply(self, module, step):
        return Scaled(module)


class MergeableScale(Scale):
    name = "scale-merge"

    def merge(self, installed, original):
        with torch.no_grad():
            original.weight.mul_(installed.s)
            if original.bias is not None:
                original.bias.mul_(installed.s)
        return original


def plugin(*objects, codecs=()):
    plugin.count = getattr(plugin, "count", 0) + 1  # a name of its own: pluggy wants one
    mod = types.ModuleType(f"contract_plugin_{plugin.count}")

    @hookimpl
    def register_methods(register):
        for m in objects:
            register(m)

    mod.register_methods = register_methods
    if codecs:
        @hookimpl
        def register_hf_peft_codecs(register):
            for c in codecs:
                register(c)

        mod.register_hf_peft_codecs = register_hf_peft_codecs
    return mod


def test_capabilities_are_protocols_a_method_declares_by_implementing_them():
    assert capabilities_of(Scale()) == []
    assert not Scale().mergeable
    assert capabilities_of(MergeableScale()) == ["mergeable"]
    assert MergeableScale().mergeable
    reg = peftspec.build_registry(autoload=False)
    lora, vera, prompt = (reg.method(n) for n in ("lora", "vera", "prompt-tuning"))
    assert isinstance(lora, Mergeable) and isinstance(lora, InitFromData)
    assert not isinstance(lora, Trains) and not isinstance(lora, PerRow)
    assert isinstance(vera, SharesRuleState) and isinstance(reg.method("adalora"), Trains)
    assert isinstance(prompt, PerRow) and not isinstance(prompt, Mergeable)
    assert reg.method("select").mergeable  # [[train]]: nothing to fold
    assert set(CAPABILITIES) == {"mergeable", "shares_rule_state", "trains", "init_from_data",
                                 "per_row"}
    assert reg.method("lora").describe()["capabilities"] == ["mergeable", "init_from_data"]


def test_the_base_method_carries_no_optional_members():
    for name in ("merge", "prepare", "training", "init_from_data", "rows_attach",
                 "to_hf_peft", "from_hf_peft", "hf_peft_types"):
        assert not hasattr(Method, name), name


def test_a_required_only_method_applies_trains_and_refuses_merge(tmp_path):
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(Scale(), MergeableScale())])
    for name, mergeable in (("scale", False), ("scale-merge", True)):
        spec = peftspec.parse_spec(f'[[reparameterize]]\nmethod = "{name}"\n'
                                   'modules = ["**.up_proj"]', registry=reg)
        model = peftspec.load_model(registry=reg)
        x = torch.randint(0, 256, (2, 8))
        before = model(x).logits
        peftspec.apply(spec, model, registry=reg)
        assert torch.equal(model(x).logits, before)
        with torch.no_grad():
            for p in peftspec.trainable_parameters(model).values():
                p.fill_(1.5)
        adapted = model(x).logits
        assert not torch.allclose(adapted, before)
        if mergeable:
            peftspec.merge(model)
            assert torch.allclose(model(x).logits, adapted, atol=1e-5)
        else:
            with pytest.raises(peftspec.NotMergeableError):
                peftspec.merge(model)


def test_the_builtin_codecs_cover_every_method_hf_peft_has():
    reg = peftspec.build_registry(autoload=False)
    with_codec = sorted(reg.codecs)
    assert with_codec == ["adalora", "ia3", "loha", "lokr", "lora", "oft", "p-tuning",
                          "prefix-tuning", "prompt-tuning", "trainable-tokens", "vera"]
    assert all(info.dist == "peftspec" for info in reg.codecs.values())
    assert codec_for(reg, "bottleneck") is None and codec_for(reg, "select") is None
    assert codec_for(reg, "trainable-tokens").beside_types == ("LORA",)


class ScaleCodec(HFPeftCodec):
    method = "scale"
    peft_types = ("SCALE",)


@pytest.mark.parametrize("codec, message", [
    (ScaleCodec, "takes a codec instance, got the class"),
    (type("NoName", (HFPeftCodec,), {})(), "names no method"),
    (type("Other", (HFPeftCodec,), {"method": "scael"})(), "'scael', which no installed plugin "
                                                             "provides (did you mean 'scale'"),
])
def test_a_bad_codec_is_reported_against_its_plugin_and_the_rest_register(codec, message):
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(Scale(), codecs=[codec])])
    assert "scale" in reg.methods and "scale" not in reg.codecs
    assert any(message in f.error for f in reg.failures), [f.error for f in reg.failures]


def test_a_second_codec_for_a_method_is_refused():
    reg = peftspec.build_registry(autoload=False, plugins=[
        plugin(Scale(), codecs=[ScaleCodec()]),
        plugin(codecs=[type("Again", (ScaleCodec,), {})()])])
    assert reg.codecs["scale"].codec.__class__ is ScaleCodec
    assert any("already provided" in f.error for f in reg.failures)


def test_a_plugin_registering_only_a_codec_is_not_empty():
    reg = peftspec.build_registry(autoload=False, plugins=[
        plugin(Scale()), plugin(codecs=[ScaleCodec()])])
    assert not reg.empty and "scale" in reg.codecs


class LegacyScale(Scale):
    """A method written for the release before codecs: HF PEFT members on itself."""

    name = "legacy-scale"
    hf_peft_types = ("LEGACY",)

    def to_hf_peft(self, rules, ctx):
        return "exported"

    def from_hf_peft(self, config, ctx):
        return "imported"


def test_a_method_with_the_old_hf_peft_members_still_converts_with_a_warning():
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(LegacyScale(), Scale())])
    with pytest.warns(DeprecationWarning, match="register_hf_peft_codecs"):
        codec = codec_for(reg, "legacy-scale")
    assert codec.peft_types == ("LEGACY",)
    assert codec.to_hf_peft([], None) == "exported"
    assert codec.from_hf_peft({}, None) == "imported"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a method without the old members: no warning
        assert codec_for(reg, "scale") is None


SHARED: dict = {}


class Careless(Scaled):
    """Every instance shares one buffer dict (as a hand-rolled fast init might)."""

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        vars(self)["_buffers"] = SHARED


class CarelessScale(Scale):
    name = "careless"

    def apply(self, module, step):
        return Careless(module)


def test_the_kit_checks_that_built_modules_are_whole_modules():
    from peftspec.testing import check_method

    report = check_method(plugin(Scale()), '[[reparameterize]]\nmethod = "scale"\n'
                          'modules = ["**.up_proj"]')
    assert report.status("modules") == "passed"
    report = check_method(plugin(CarelessScale()), '[[reparameterize]]\nmethod = "careless"\n'
                          'modules = ["**.up_proj"]', raise_on_failure=False)
    failed = {r.check: r.detail for r in report.failures}
    assert "share one _buffers dict" in failed.get("modules", ""), report
