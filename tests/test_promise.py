"""The framework checks its own promise: after every apply, and at registration.

Each broken plugin here is in-process (``build_registry(autoload=False,
plugins=[...])``), with ``__peftspec_dist__`` standing for the distribution
name a real install would have; the CLI test installs a plugin the real way,
as a dist-info folder with an entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftspec
from peftspec import Method, hookimpl, option, selectors

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Opts:
    modules: tuple[str, ...] = selectors(doc="modules")
    size: int = option(4, doc="width", min=1)


class Wrapped(nn.Module):
    """A Linear with an extra adapter vector; ``weight`` is whatever it is given."""

    def __init__(self, weight, bias, n, report=True):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.vec = nn.Parameter(torch.zeros(n))
        self.report = report

    def adapter_params(self):
        return {"vec": self.vec} if self.report else {}

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.vec.sum()


class Good(Method):
    name, family, Options = "good-vec", "augment", Opts

    def count_params(self, module, step):
        return module.out_features

    def apply(self, module, step):
        return Wrapped(module.weight, module.bias, module.out_features)


class Cloning(Good):
    name = "cloning"

    def apply(self, module, step):  # breaks the promise: a copy of the base weight
        return Wrapped(nn.Parameter(module.weight.detach().clone()), module.bias,
                       module.out_features)


class DataSwap(Good):
    name = "data-swap"

    def apply(self, module, step):  # the same Parameter object, other memory
        module.weight.data = module.weight.data.clone()
        return Wrapped(module.weight, module.bias, module.out_features)


class Miscount(Good):
    name = "miscount"

    def count_params(self, module, step):
        return 1024


class Unreported(Good):
    name = "unreported"

    def apply(self, module, step):
        return Wrapped(module.weight, module.bias, module.out_features, report=False)


def plugin(*methods, dist="peftspec-broken", **extra):
    mod = types.ModuleType(f"plugin_{dist.replace('-', '_')}")

    @hookimpl
    def register_methods(register):
        for m in methods:
            register(m)

    mod.register_methods = register_methods
    mod.__peftspec_dist__ = dist
    for k, v in extra.items():
        setattr(mod, k, v)
    return mod


def tiny():
    from peftspec.models.nanogpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


RULE = """
[[reparameterize]]
method = "lora"
modules = ["**.q_proj"]

[[augment]]
method = "{name}"
modules = ["**.v_proj"]
"""


def snapshot(model):
    return ({n: (type(m), m) for n, m in model.named_modules()},
            {n: (p, p.detach().clone(), p.requires_grad, p.data_ptr())
             for n, p in model.named_parameters()})


def assert_unchanged(model, snap, ids, out):
    modules, params = snap
    assert not peftspec.is_patched(model)
    assert {n: (type(m), m) for n, m in model.named_modules()} == modules
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (p, value, grad, ptr) in params.items():
        assert now[n] is p and p.requires_grad == grad and torch.equal(p, value)
        assert p.data_ptr() == ptr  # memory too: a swapped .data is put back
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out)


@pytest.mark.parametrize("method, words", [
    (Cloning(), ["no longer in the model", "'blocks.0.attn.v_proj.weight'",
                 "self.weight = base.weight"]),
    (DataSwap(), ["other memory", "'blocks.0.attn.v_proj.weight'"]),
    (Miscount(), ["count_params announced 2,048 parameters, apply added 64"]),
    (Unreported(), ["no adapter_params() reports", "blocks.0.attn.v_proj.vec"]),
])
def test_a_broken_promise_is_a_plugin_error_and_the_model_is_rolled_back(method, words):
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(method)])
    model = tiny()
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids).logits
    snap = snapshot(model)
    spec = peftspec.parse_spec(RULE.format(name=method.name), registry=reg)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.apply(spec, model, registry=reg)
    msg = str(exc.value)
    assert f"plugin 'peftspec-broken', method '{method.name}'" in msg
    assert "lora" not in msg.split("(in all")[0]  # the well-behaved plugin is not blamed
    for w in words:
        assert w in msg
    assert "left as it was" in msg
    assert_unchanged(model, snap, ids, out)


class Adopting(nn.Module):
    """Takes every tensor of the module it is given, but the base weight only as a
    copy, which it takes *out* of that module: the module it is given then looks
    kept by name, and the base weight is gone from the model."""

    def __init__(self, module):
        super().__init__()
        w = module._parameters.pop("weight")
        for key, p in module._parameters.items():
            self.register_parameter(key, p)
        self.weight = nn.Parameter(w.detach().clone())
        self.vec = nn.Parameter(torch.zeros(w.shape[0]))
        self.adopted = module.adapter_params()  # reported still: the count is right

    def adapter_params(self):
        return {"vec": self.vec, **self.adopted}

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.vec.sum()


class Robbing(Good):
    name = "robbing"

    def apply(self, module, step):
        return Adopting(module)


def test_a_second_method_on_a_module_cannot_rob_the_first_unseen():
    """apply checks each step's modules as it installs them; a later method on the
    same module may change the earlier one's afterwards, and is caught too."""
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(Robbing())])
    model = tiny()
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids).logits
    snap = snapshot(model)
    spec = peftspec.parse_spec(RULE.replace("q_proj", "v_proj").format(name="robbing"),
                               registry=reg)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.apply(spec, model, registry=reg)
    msg = str(exc.value)
    assert "plugin 'peftspec-broken', method 'robbing'" in msg  # the later one is blamed
    assert "no longer in the model" in msg and "'blocks.0.attn.v_proj.weight'" in msg
    assert_unchanged(model, snap, ids, out)


def test_a_well_behaved_plugin_passes_the_check():
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(Good())])
    model = tiny()
    spec = peftspec.parse_spec(RULE.format(name="good-vec"), registry=reg)
    peftspec.apply(spec, model, registry=reg)
    assert "blocks.1.attn.v_proj.vec" in peftspec.trainable_parameters(model)


def test_the_check_runs_for_a_second_adapter_and_keeps_the_first():
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(Good(), Cloning())])
    model = tiny()
    peftspec.apply(peftspec.parse_spec(RULE.format(name="good-vec"), registry=reg), model,
                   registry=reg)
    first = dict(peftspec.trainable_parameters(model))
    plan = peftspec.compile_plan(peftspec.parse_spec(RULE.format(name="cloning"),
                                                     registry=reg), model, registry=reg)
    with pytest.raises(peftspec.PluginError, match="method 'cloning'"):
        peftspec.apply_plan(plan, model, registry=reg, name="second")
    assert peftspec.adapter_names(model) == ["default"]
    assert peftspec.active_adapter(model) == "default"
    assert peftspec.trainable_parameters(model) == first


# -- registration --------------------------------------------------------------------

class NotADataclass:
    modules: tuple[str, ...] = ()


@dataclass
class NotFrozen:
    modules: tuple[str, ...] = selectors(doc="modules")


@dataclass(frozen=True)
class BadSelector:
    modules: str = selectors(doc="one string, not a list")


def _with_options(cls, name):
    return type(name.title().replace("-", ""), (Good,), {"name": name, "Options": cls})()


@pytest.mark.parametrize("cls, words", [
    (NotADataclass, "is not a dataclass: decorate it with @dataclass(frozen=True)"),
    (NotFrozen, "is not frozen: use @dataclass(frozen=True)"),
    (BadSelector, "must be annotated tuple[str, ...]"),
])
def test_registration_validates_options_and_names_the_distribution(cls, words):
    bad = _with_options(cls, "bad-opts")
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(bad, Good(),
                                                                  dist="peftspec-mylora")])
    assert "bad-opts" not in reg.methods
    assert reg.methods["good-vec"].dist == "peftspec-mylora"  # the plugin's other method
    (failure,) = [f for f in reg.failures if f.dist == "peftspec-mylora"]
    assert "method 'bad-opts'" in failure.error and words in failure.error
    assert "peftspec-mylora" in str(failure)
    with pytest.raises(peftspec.SpecError, match="unknown method 'bad-opts'"):
        peftspec.parse_spec(RULE.format(name="bad-opts"), registry=reg)


def test_mergeable_without_merge_is_refused():
    class Claims(Good):
        name, mergeable = "claims", True

    reg = peftspec.build_registry(autoload=False, plugins=[plugin(Claims())])
    assert "claims" not in reg.methods
    assert any("mergeable = True but does not implement merge" in f.error for f in reg.failures)


def test_a_hook_without_hookimpl_is_reported_as_registering_nothing():
    mod = types.ModuleType("forgot")
    def register_methods(register):  # noqa: E306 - no @hookimpl: pluggy ignores it
        register(Good())
    mod.register_methods = register_methods
    mod.__peftspec_dist__ = "peftspec-forgot"
    quiet = plugin(dist="peftspec-quiet")  # a hook that registers nothing
    reg = peftspec.build_registry(autoload=False, plugins=[mod, quiet])
    empty = {e.dist: e for e in reg.empty}
    assert "register_methods() is not marked with @peftspec.hookimpl" in empty[
        "peftspec-forgot"].reason
    assert "called register() for nothing" in empty["peftspec-quiet"].reason
    # and a spec naming the method it meant to register says why it is unknown
    with pytest.raises(peftspec.SpecError) as exc:
        peftspec.parse_spec(RULE.format(name="good-vec"), registry=reg)
    assert "unknown method 'good-vec'" in str(exc.value)
    assert "'peftspec-forgot' registered nothing" in str(exc.value)
    # built-ins are not reported, nor a plugin with only a check_plan hook
    checker = types.ModuleType("checker")
    checker.check_plan = hookimpl(lambda plan: None)
    reg = peftspec.build_registry(autoload=False, plugins=[checker])
    assert not reg.empty


def test_cli_plugins_warns_about_an_empty_plugin_and_never_truncates(tmp_path):
    """A real installation (dist-info with an entry point) whose hook lacks @hookimpl."""
    site = tmp_path / "site"
    (site / "peftspec_forgot_pkg").mkdir(parents=True)
    (site / "peftspec_forgot_pkg" / "__init__.py").write_text(textwrap.dedent("""\
        def register_methods(register):
            raise AssertionError("never called: not a hook implementation")
        """))
    (site / "peftspec_long_pkg").mkdir()
    (site / "peftspec_long_pkg" / "__init__.py").write_text(textwrap.dedent("""\
        from peftspec import hookimpl
        from peftspec_plugins.selective import Select

        class LongName(Select):
            name = "a-rather-long-method-name-for-the-table"
            summary = "a summary long enough to need the room the names take " * 2

        @hookimpl
        def register_methods(register):
            register(LongName())
        """))
    dist = "peftspec-a-very-long-distribution-name-for-a-method"
    long_dist = "peftspec-another-distribution-with-a-long-name"
    for name, ep in ((dist, "forgot = peftspec_forgot_pkg"), (long_dist,
                                                               "long = peftspec_long_pkg")):
        info = site / f"{name.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                       "Version: 0.0.1\n")
        (info / "entry_points.txt").write_text(f"[peftspec]\n{ep}\n")
    env = {k: v for k, v in os.environ.items() if k != "PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]),
               COLUMNS="80")
    run = lambda *a: subprocess.run([sys.executable, "-c", "from peftspec.cli import main; "
                                     "main()", "plugins", *a], capture_output=True, text=True,
                                    env=env, cwd=REPO)
    res = run()
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    assert f"'{dist}'" in " ".join(text.split())  # whole, possibly wrapped only at spaces
    assert "register_methods() is not marked with @peftspec.hookimpl" in " ".join(text.split())
    assert "…" not in res.stdout
    # names too long for a table row at 80 columns: listed whole, never cropped
    lines = res.stdout.splitlines()
    assert "a-rather-long-method-name-for-the-table" in lines
    assert any(long_dist in line for line in lines)
    # and with room, one table row holds both, uncut
    env["COLUMNS"] = "200"
    row = next(line for line in run().stdout.splitlines() if "a-rather-long-method" in line)
    assert "a-rather-long-method-name-for-the-table" in row and long_dist in row
    env["COLUMNS"] = "80"
    for name in ("prompt-tuning", "prefix-tuning", "bottleneck", "peftspec"):
        assert name in res.stdout
    data = json.loads(run("--json").stdout)
    (empty,) = data["empty"]
    assert empty["distribution"] == dist and "hookimpl" in empty["reason"]
