"""The framework catches a plugin that writes a frozen base tensor's values in
place during apply (issue 27, point 2), whoever wrote the plugin: the kit is
not needed for it. A write through torch (``add_``, ``.data``, a view, ``t[i] =
v``, ``out=``, ``torch.nn.init``) is refused before it happens
(``core.barrier``), so the model is left exactly as it was; one that is not a
torch call (numpy, raw memory) is caught by a few bytes sampled when the
memory leaves torch (``.numpy()``, ``data_ptr()``) and reported as not
restorable. Either way the modules are rolled back and the
error names the distribution, method, rule and tensor."""

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


def wrapped(module):
    return Wrapped(module.weight, module.bias, module.out_features)


class AddsInPlace(Good):
    name = "adds-in-place"

    def apply(self, module, step):  # the same object, the same memory, other values
        with torch.no_grad():
            module.weight.add_(1e-3)
        return wrapped(module)


class WritesThenFails(Good):
    name = "writes-then-fails"

    def apply(self, module, step):
        with torch.no_grad():
            module.bias.add_(1.0)
        raise ValueError("something else went wrong")


class WritesData(Good):
    """Through ``.data``: the version counter would not see it."""
    name = "writes-data"

    def apply(self, module, step):
        module.weight.data.mul_(1.5)
        return wrapped(module)


class FlipsOneBit(Good):
    """Changes one element by the smallest step, through a reinterpreting view."""
    name = "flips-one-bit"
    where, bit = (0, 0), 0

    def apply(self, module, step):
        w = module.weight
        with torch.no_grad():
            w.view(torch.int32)[self.where] ^= 1 << self.bit
        return wrapped(module)


class SetsItem(Good):
    name = "sets-item"

    def apply(self, module, step):
        with torch.no_grad():
            module.weight[1] = 0.0
        return wrapped(module)


class InitsBase(Good):
    name = "inits-base"

    def apply(self, module, step):
        torch.nn.init.kaiming_uniform_(module.weight)
        return wrapped(module)


class WritesOut(Good):
    name = "writes-out"

    def apply(self, module, step):
        with torch.no_grad():
            torch.mul(module.bias, 2.0, out=module.bias.detach())
        return wrapped(module)


class Swallows(Good):
    """Catches the refusal and carries on: still reported."""
    name = "swallows"

    def apply(self, module, step):
        try:
            with torch.no_grad():
                module.weight.zero_()
        except RuntimeError:
            pass
        return wrapped(module)


class WritesNumpy(Good):
    """Not a torch call: only the sampled bytes see it, and it cannot be undone."""
    name = "writes-numpy"

    def apply(self, module, step):
        module.weight.detach().numpy()[0, 0] += 1.0
        return wrapped(module)


class WritesRaw(Good):
    """Raw memory at the weight's middle, through its data pointer."""
    name = "writes-raw"

    def apply(self, module, step):
        import ctypes

        w = module.weight
        mid = w.data_ptr() + (w.numel() * w.element_size() // 2 & ~15)
        ctypes.memset(mid, 0x7F, 4)
        return wrapped(module)


class PreparesInPlace(Good):
    """A rule-sharing method (VeRA's kind) whose ``prepare`` writes through ``.data``."""
    name = "prepares-in-place"

    def prepare(self, modules, steps):
        with torch.no_grad():
            next(iter(modules.values())).weight.data.mul_(2.0)


class OwnTensorsInPlace(Good):
    """In-place work on its own new tensors, reads of the base, autograd flags: fine."""
    name = "own-in-place"

    def apply(self, module, step):
        extra = torch.empty_like(module.weight)
        torch.nn.init.normal_(extra)
        extra.add_(module.weight).mul_(0.0)
        module.weight.requires_grad_(False)
        return wrapped(module)


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
    ``written`` (the tensors the plugin wrote: reported, not restorable)."""
    modules, params = snap
    assert not peftspec.is_patched(model)
    assert {n: (type(m), m) for n, m in model.named_modules()} == modules
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (p, value, grad, ptr) in params.items():
        assert now[n] is p and p.requires_grad == grad and p.data_ptr() == ptr
        assert torch.equal(p, value) != (n in written), n


def _refused(method, tensor):
    reg, model, ids, out, spec = _setup(method)
    snap = snapshot(model)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.apply(spec, model, registry=reg)
    msg = str(exc.value)
    assert f"plugin 'peftspec-broken', method '{method.name}'" in msg
    assert "augment[0], spec line 6" in msg
    assert f"'blocks.0.attn.v_proj.{tensor}'" in msg and "in place" in msg
    assert "refused the write before it happened" in msg and "reload" not in msg
    assert_unchanged(model, snap, ids, out)  # values included: nothing was written
    return msg


@pytest.mark.parametrize("method, tensor, op", [
    (AddsInPlace(), "weight", "add_"), (WritesData(), "weight", "mul_"),
    (FlipsOneBit(), "weight", "__ixor__"), (SetsItem(), "weight", "__setitem__"),
    (InitsBase(), "weight", "kaiming_uniform_"), (WritesOut(), "bias", "mul"),
    (Swallows(), "weight", "zero_"), (WritesThenFails(), "bias", "add_"),
    (PreparesInPlace(), "weight", "mul_")])
def test_a_torch_write_into_the_base_is_refused_before_it_happens(method, tensor, op):
    assert f"({op})" in _refused(method, tensor)


@pytest.mark.parametrize("method", [WritesNumpy(), WritesRaw()], ids=["numpy", "raw"])
def test_a_write_outside_torch_is_caught_and_named_as_not_restorable(method):
    reg, model, ids, out, spec = _setup(method)
    snap = snapshot(model)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.apply(spec, model, registry=reg)
    msg = str(exc.value)
    # compared once after the last step: both targets were written by then
    assert f"method '{method.name}'" in msg and "'blocks.0.attn.v_proj.weight'" in msg
    assert "'blocks.1.attn.v_proj.weight'" in msg
    assert "in place" in msg and "reload the model" in msg
    assert_rolled_back(model, snap, {f"blocks.{i}.attn.v_proj.weight" for i in (0, 1)})


@pytest.mark.parametrize("method", [Good(), OwnTensorsInPlace()], ids=["good", "own-in-place"])
def test_a_well_behaved_apply_is_not_flagged(method):
    """Nor is in-place work on its own new tensors, reads of the base, or autograd flags."""
    reg, model, ids, out, spec = _setup(method)
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
def test_any_in_place_change_through_torch_is_refused(row, col, bit):
    """Anywhere in the tensor, however small: refused, and nothing changed."""
    method = FlipsOneBit()
    method.where, method.bit = (row, col), bit
    _refused(method, "weight")


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
    assert "v_proj.weight'" in text and "in place" in text and "refused the write" in text
    assert not (tmp_path / "a.safetensors").exists()


def test_built_in_methods_skip_the_barrier_and_a_write_is_still_caught(monkeypatch):
    """peftspec's own methods run without the barrier (its per-call cost exceeds
    apply's: bench_value_guard); the version counters still catch a torch write."""
    from peftspec.core.barrier import built_in
    from peftspec_plugins.ia3 import IA3

    reg = peftspec.build_registry()
    assert built_in(reg.methods["ia3"]) and built_in(reg.methods["lora"])
    assert not built_in(peftspec.build_registry(autoload=False, plugins=[plugin(Good())])
                        .methods[Good.name])
    plain = IA3.apply

    def writes(self, module, step):
        with torch.no_grad():
            module.weight.add_(1e-3)
        return plain(self, module, step)

    monkeypatch.setattr(IA3, "apply", writes)
    model = tiny()
    snap = snapshot(model)
    spec = peftspec.parse_spec('[[augment]]\nmethod = "ia3"\nmodules = ["**.v_proj"]\n')
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.apply(spec, model, registry=reg)
    msg = str(exc.value)
    assert "plugin 'peftspec', method 'ia3' (augment[0], spec line 1)" in msg
    assert "'blocks.0.attn.v_proj.weight', 'blocks.1.attn.v_proj.weight'" in msg
    assert "reload the model" in msg
    assert_rolled_back(model, snap, {f"blocks.{i}.attn.v_proj.weight" for i in (0, 1)})


def test_a_write_by_an_after_apply_hook_is_caught():
    @peftspec.hookimpl
    def after_apply(model, plan):
        with torch.no_grad():  # through .data: no version counter sees it
            model.blocks[0].attn.q_proj.weight.data.mul_(2.0)

    reg = peftspec.build_registry(autoload=False,
                                  plugins=[plugin(Good(), after_apply=after_apply)])
    model = tiny()
    spec = peftspec.parse_spec(RULE.format(name=Good.name), registry=reg)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.apply(spec, model, registry=reg)
    msg = str(exc.value)
    assert "an after_apply hook" in msg and "'blocks.0.attn.q_proj.weight'" in msg
    assert not peftspec.is_patched(model)
