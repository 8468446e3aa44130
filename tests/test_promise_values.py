"""The framework catches a plugin that writes a frozen base tensor's values in
place during apply (issue 27, point 2): the modules are rolled back and the
error names the distribution, method, rule and tensor, and says the values
cannot be put back (no copy of the base is kept: the check must stay cheap).
Whoever wrote the plugin: the kit is not needed for it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, strategies as st

import peftspec
from test_promise import REPO, Good, RULE, Wrapped, assert_unchanged, plugin, snapshot, tiny


class AddsInPlace(Good):
    name = "adds-in-place"

    def apply(self, module, step):  # the same object, the same memory, other values
        with torch.no_grad():
            module.weight.add_(1e-3)
        return Wrapped(module.weight, module.bias, module.out_features)


class WritesThenFails(Good):
    name = "writes-then-fails"

    def apply(self, module, step):
        with torch.no_grad():
            module.bias.add_(1.0)
        raise ValueError("something else went wrong")


class WritesData(Good):
    """Through ``.data``: the version counter does not see it, the sampled bytes do."""
    name = "writes-data"

    def apply(self, module, step):
        module.weight.data.mul_(1.5)
        return Wrapped(module.weight, module.bias, module.out_features)


class FlipsOneBit(Good):
    """Changes one element by the smallest step: a checksum must see it."""
    name = "flips-one-bit"
    where, bit = (0, 0), 0

    def apply(self, module, step):
        w = module.weight
        with torch.no_grad():
            w.view(torch.int32)[self.where] ^= 1 << self.bit
        return Wrapped(w, module.bias, module.out_features)


def _setup(method):
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(method)])
    model = tiny()
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids).logits
    spec = peftspec.parse_spec(RULE.format(name=method.name), registry=reg)
    return reg, model, ids, out, spec


def assert_rolled_back(model, snap, written):
    """Modules, tensor objects, memory and flags as before; values too, but for
    ``written`` (the tensor the plugin wrote: reported, not restorable)."""
    modules, params = snap
    assert not peftspec.is_patched(model)
    assert {n: (type(m), m) for n, m in model.named_modules()} == modules
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (p, value, grad, ptr) in params.items():
        assert now[n] is p and p.requires_grad == grad and p.data_ptr() == ptr
        assert torch.equal(p, value) != (n == written), n


@pytest.mark.parametrize("method, tensor", [(AddsInPlace(), "weight"), (WritesData(), "weight"),
                                            (FlipsOneBit(), "weight")])
def test_an_in_place_write_is_caught_at_apply_and_named(method, tensor):
    reg, model, ids, out, spec = _setup(method)
    snap = snapshot(model)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.apply(spec, model, registry=reg)
    msg = str(exc.value)
    assert f"plugin 'peftspec-broken', method '{method.name}'" in msg
    assert "augment[0], spec line 6" in msg
    assert f"'blocks.0.attn.v_proj.{tensor}'" in msg and "in place" in msg
    assert "lora" not in msg and "reload the model" in msg
    assert_rolled_back(model, snap, f"blocks.0.attn.v_proj.{tensor}")


def test_a_write_before_apply_raises_is_named_first():
    reg, model, ids, out, spec = _setup(WritesThenFails())
    snap = snapshot(model)
    with pytest.raises(peftspec.PluginError, match="before raising") as exc:
        peftspec.apply(spec, model, registry=reg)
    assert "'blocks.0.attn.v_proj.bias'" in str(exc.value)
    assert "something else went wrong" in str(exc.value.__context__)
    assert_rolled_back(model, snap, "blocks.0.attn.v_proj.bias")


def test_a_well_behaved_apply_is_not_flagged():
    reg, model, ids, out, spec = _setup(Good())
    snap = snapshot(model)
    peftspec.apply(spec, model, registry=reg)
    peftspec.remove(model)
    assert_unchanged(model, snap, ids, out)


def test_a_base_note_rule_may_rewrite_its_base():
    """PiSSA announces its residual (Method.base_note): not an error."""
    spec = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n'
                               'init = "pissa"\n')
    model = tiny()
    before = model.blocks[0].attn.q_proj.weight.detach().clone()
    peftspec.apply(spec, model)
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, before)


@given(st.integers(0, 31), st.integers(0, 31), st.integers(0, 31))
def test_any_in_place_change_through_torch_is_caught(row, col, bit):
    """Anywhere in the tensor, however small: the version counter sees it."""
    method = FlipsOneBit()
    method.where, method.bit = (row, col), bit
    reg, model, ids, out, spec = _setup(method)
    snap = snapshot(model)
    with pytest.raises(peftspec.PluginError, match="flips-one-bit"):
        peftspec.apply(spec, model, registry=reg)
    assert_rolled_back(model, snap, "blocks.0.attn.v_proj.weight")


def test_cli_apply_refuses_an_in_place_write(tmp_path):
    """Installed the real way (dist-info, entry point), through `peftspec apply`."""
    site = tmp_path / "site"
    (site / "peftspec_inplace_pkg").mkdir(parents=True)
    (site / "peftspec_inplace_pkg" / "__init__.py").write_text(textwrap.dedent("""\
        import torch
        from peftspec import hookimpl
        from peftspec_plugins.ia3 import IA3

        class InPlaceIA3(IA3):
            name = "ia3-in-place"

            def apply(self, module, step):
                with torch.no_grad():
                    module.weight.add_(1e-3)
                return super().apply(module, step)

        @hookimpl
        def register_methods(register):
            register(InPlaceIA3())
        """))
    info = site / "peftspec_inplace-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peftspec-inplace\n"
                                   "Version: 0.0.1\n")
    (info / "entry_points.txt").write_text("[peftspec]\ninplace = peftspec_inplace_pkg\n")
    spec = tmp_path / "spec.toml"
    spec.write_text('[[augment]]\nmethod = "ia3-in-place"\nmodules = ["**.v_proj"]\n')
    env = {k: v for k, v in os.environ.items() if k != "PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]),
               COLUMNS="200")
    res = subprocess.run([sys.executable, "-c", "from peftspec.cli import main; main()",
                          "apply", str(spec), "--out", str(tmp_path / "a.safetensors")],
                         capture_output=True, text=True, env=env, cwd=REPO)
    text = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0, text
    assert "plugin 'peftspec-inplace', method 'ia3-in-place'" in text
    assert "v_proj.weight'" in text and "in place" in text
    assert not (tmp_path / "a.safetensors").exists()
