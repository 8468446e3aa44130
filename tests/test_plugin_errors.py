"""Whatever a plugin's hook raises reaches the user as a peftspec error naming the
distribution, method, rule and spec line (issue 27, point 4), and an option's
refusal points at that option's own line (point 5).

A ValueError is the plugin refusing the input: exit 2 (at compile, one of the
spec's problems). Anything else is the plugin failing: PluginError, exit 3. A
PeftspecError the plugin raises keeps its class and message and gains the
context. The original exception stays chained; a failed apply leaves the model
as it was. The CLI tests install the plugin the real way (a dist-info folder
with an entry point) and run the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

import peftspec
from peftspec import option, selectors
from test_promise import REPO, Good, Opts, Wrapped, assert_unchanged, plugin, snapshot, tiny

DIST = "peftspec-broken"


def _rule(name, extra=""):
    return f'[[augment]]\nmethod = "{name}"\nmodules = ["**.v_proj"]\n{extra}'


def _setup(*methods):
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(*methods)])
    model = tiny()
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids).logits
    return reg, model, ids, out


class CheckRefuses(Good):
    name = "check-refuses"

    def check(self, module, step):
        raise ValueError("scale must be nonzero")


class CheckBug(Good):
    name = "check-bug"

    def check(self, module, step):
        return {}["missing"]


class ApplyRefuses(Good):
    name = "apply-refuses"

    def apply(self, module, step):
        raise ValueError("this module's width does not suit the options")


class ApplyBug(Good):
    name = "apply-bug"

    def apply(self, module, step):
        Wrapped(module.weight, module.bias, module.out_features)
        return {}["lookup"]


class ApplyOwnError(Good):
    name = "apply-own-error"

    def apply(self, module, step):
        raise peftspec.NotMergeableError("something peftspec-shaped")


@pytest.mark.parametrize("method, kind, code, words", [
    (ApplyRefuses(), peftspec.PluginInputError, 2,
     ["refused on 'blocks.0.attn.v_proj' in apply", "does not suit the options"]),
    (ApplyBug(), peftspec.PluginError, 3,
     ["failed in apply on 'blocks.0.attn.v_proj': KeyError: 'lookup'", "plugin failing"]),
    (ApplyOwnError(), peftspec.NotMergeableError, 1,
     ["apply on 'blocks.0.attn.v_proj': something peftspec-shaped"]),
])
def test_an_exception_from_apply_is_named_and_the_model_rolled_back(method, kind, code, words):
    reg, model, ids, out = _setup(method)
    snap = snapshot(model)
    spec = peftspec.parse_spec(_rule(method.name), file="s.toml", registry=reg)
    with pytest.raises(kind) as exc:
        peftspec.apply(spec, model, registry=reg)
    msg = str(exc.value)
    assert exc.value.exit_code == code
    assert f"plugin '{DIST}', method '{method.name}' (augment[0], s.toml:1)" in msg, msg
    for w in words:
        assert w in msg
    if kind is not peftspec.NotMergeableError:  # a new error, the plugin's chained
        assert type(exc.value.__cause__) in (ValueError, KeyError)
    assert_unchanged(model, snap, ids, out)


def test_a_refusal_from_check_is_a_spec_problem_at_the_rules_line():
    reg, model, ids, out = _setup(CheckRefuses())
    spec = peftspec.parse_spec(_rule("check-refuses"), file="s.toml", registry=reg)
    with pytest.raises(peftspec.SpecError) as exc:
        peftspec.apply(spec, model, registry=reg)
    assert exc.value.exit_code == 2
    # said once for the rule, not once per module it matched
    assert [str(p) for p in exc.value.problems] == [
        f"s.toml:1: augment[0]: plugin '{DIST}', method 'check-refuses' refused "
        "'blocks.0.attn.v_proj' (Linear) in check: scale must be nonzero"]
    assert isinstance(exc.value.__cause__, ValueError)
    assert not peftspec.is_patched(model)


def test_a_bug_in_check_is_a_plugin_error():
    reg, model, ids, out = _setup(CheckBug())
    spec = peftspec.parse_spec(_rule("check-bug"), file="s.toml", registry=reg)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.compile_plan(spec, model, registry=reg)
    assert exc.value.exit_code == 3
    assert (f"plugin '{DIST}', method 'check-bug' (augment[0], s.toml:1) failed in check on "
            "'blocks.0.attn.v_proj': KeyError: 'missing'") in str(exc.value)
    assert isinstance(exc.value.__cause__, KeyError)


# -- every other hook the framework calls ----------------------------------------

class BadCount(Good):
    name = "bad-count"

    def count_params(self, module, step):
        raise AttributeError("no such attribute")


class BadResolve(Good):
    name = "bad-resolve"

    def resolve_options(self, options, model):
        raise IndexError("list index out of range")


class BadNote(Good):
    name = "bad-note"

    def base_note(self, options):
        raise RuntimeError("note broke")


class BadPrepare(Good):
    name = "bad-prepare"

    def prepare(self, modules, steps):
        raise RuntimeError("prepare broke")


class BadMerge(Good):
    name = "bad-merge"

    def merge(self, installed, original):
        raise RuntimeError("merge broke")


class InPlace(Good):
    """Patches the module in place (a hook), with detach/attach that fail."""
    name = "bad-detach"

    def count_params(self, module, step):
        return 0

    def apply(self, module, step):
        return module

    def detach(self, installed, original, step):
        raise RuntimeError("detach broke")


@dataclass(frozen=True)
class BuggyOpts:
    modules: tuple[str, ...] = selectors(doc="modules")
    size: int = option(4, doc="width")

    def __post_init__(self):
        {}["size"]


class BadOptions(Good):
    name, Options = "bad-options", BuggyOpts


@pytest.mark.parametrize("method, hook, run", [
    (BadCount(), "count_params", "compile"),
    (BadResolve(), "resolve_options", "compile"),
    (BadNote(), "base_note", "compile"),
    (BadPrepare(), "prepare", "apply"),
    (BadMerge(), "merge", "merge"),
    (InPlace(), "detach", "use"),
])
def test_every_hook_names_the_plugin_rule_and_line(method, hook, run):
    reg, model, ids, out = _setup(method)
    snap = snapshot(model)
    spec = peftspec.parse_spec("\n\n" + _rule(method.name), file="s.toml", registry=reg)
    with pytest.raises(peftspec.PluginError) as exc:
        if run == "compile":
            peftspec.compile_plan(spec, model, registry=reg)
        elif run == "apply":
            peftspec.apply(spec, model, registry=reg)
        else:
            peftspec.apply(spec, model, registry=reg)
            if run == "merge":
                peftspec.merge(model)
            else:
                peftspec.use(model, None)
    msg = str(exc.value)
    assert exc.value.exit_code == 3 and exc.value.__cause__ is not None
    assert f"plugin '{DIST}', method '{method.name}' (augment[0], s.toml:3)" in msg, msg
    assert f"failed in {hook}" in msg
    if run in ("compile", "apply"):
        assert_unchanged(model, snap, ids, out)


def test_a_bug_in_an_options_class_names_the_plugin():
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(BadOptions())])
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.parse_spec("\n" + _rule("bad-options"), file="s.toml", registry=reg)
    assert (f"plugin '{DIST}', method 'bad-options' (augment[0], s.toml:2): its options "
            "class BuggyOpts failed: KeyError: 'size'") in str(exc.value)
    assert isinstance(exc.value.__cause__, KeyError)


class Stateful(Wrapped):
    def adapter_state(self):
        return {"vec": self.vec}

    def load_adapter_state(self, tensors):
        raise RuntimeError("cannot take it back")


class BadLoad(Good):
    name = "bad-load"

    def apply(self, module, step):
        return Stateful(module.weight, module.bias, module.out_features)


def test_a_failing_load_adapter_state_is_named_and_the_load_undone(tmp_path):
    reg, model, ids, out = _setup(BadLoad())
    spec = peftspec.parse_spec(_rule("bad-load"), file="s.toml", registry=reg)
    peftspec.apply(spec, model, registry=reg)
    peftspec.save_adapter(model, tmp_path / "a.safetensors")
    fresh = tiny()
    snap = snapshot(fresh)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.load_adapter(fresh, tmp_path / "a.safetensors", registry=reg)
    msg = str(exc.value)
    where = f"{tmp_path / 'a.safetensors'} (embedded spec):1"  # the spec the file holds
    assert f"plugin '{DIST}', method 'bad-load' (augment[0], {where})" in msg, msg
    assert "load_adapter_state of module 'blocks.0.attn.v_proj'" in msg
    assert "cannot take it back" in msg
    assert_unchanged(fresh, snap, ids, out)


# -- point 5: the option's own line -------------------------------------------------

@dataclass(frozen=True)
class FourierOpts:
    modules: tuple[str, ...] = selectors(doc="modules")
    scale: float = option(1.0, doc="scale")
    n: int = option(100, doc="spectral coefficients")


class Fourier(Good):
    name, Options = "fourier", FourierOpts

    def check(self, module, step):
        cap = module.in_features * module.out_features
        if step.options.n > cap:
            return f"n = {step.options.n} exceeds in*out = {cap} of this module"
        return None


class FourierRaises(Fourier):
    name = "fourier-raises"

    def check(self, module, step):
        if step.options.scale == 0:
            raise peftspec.OptionError("scale", "must be nonzero")
        return super().check(module, step)


@dataclass(frozen=True)
class PostInitOpts(FourierOpts):
    def __post_init__(self):
        if self.n > 1000:
            raise ValueError(f"n = {self.n} is more than 1000")


class FourierPost(Fourier):
    name, Options = "fourier-post", PostInitOpts


FOURIER = """\
[[augment]]
method = "{name}"
modules = ["**.v_proj"]
n = {n}
scale = {scale}
"""


@pytest.mark.parametrize("name, n, scale, line, key, words", [
    ("fourier", 100000, 1.0, 4, "n", "n = 100000 exceeds in*out = 1024"),
    ("fourier-raises", 10, 0, 5, "scale", "refused 'blocks.0.attn.v_proj' (Linear) in check: "
                                         "must be nonzero"),
])
def test_an_options_refusal_points_at_the_options_line(name, n, scale, line, key, words):
    reg, model, _, _ = _setup(Fourier(), FourierRaises())
    spec = peftspec.parse_spec(FOURIER.format(name=name, n=n, scale=scale), file="s.toml",
                               registry=reg)
    with pytest.raises(peftspec.SpecError) as exc:
        peftspec.compile_plan(spec, model, registry=reg)
    problem = exc.value.problems[0]  # (a returned reason: one per module, each named)
    assert (problem.line, problem.key) == (line, f"augment[0].{key}")
    assert str(problem).startswith(f"s.toml:{line}: augment[0].{key}: ") and words in str(problem)


def test_a_post_init_refusal_points_at_the_options_line():
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(FourierPost())])
    with pytest.raises(peftspec.SpecError) as exc:
        peftspec.parse_spec(FOURIER.format(name="fourier-post", n=100000, scale=1.0),
                            file="s.toml", registry=reg)
    assert [str(p) for p in exc.value.problems] == [
        "s.toml:4: augment[0].n: n = 100000 is more than 1000"]


def test_a_message_naming_no_option_or_several_stays_at_the_rule():
    from peftspec.core.options import named_key

    keys = ["method", "modules", "n", "scale"]
    assert named_key("n = 3 exceeds the width", keys, FourierOpts) == "n"
    assert named_key("LoRA adapts Linear modules only", keys, FourierOpts) is None
    assert named_key("n and scale disagree", keys, FourierOpts) is None
    assert named_key("the rank is too large", keys, FourierOpts) is None  # no word 'n'
    assert named_key(peftspec.OptionError("modules", "empty"), keys, FourierOpts) == "modules"


# -- the real CLI, a plugin installed as a distribution -------------------------------

PLUGIN = '''
import torch
import torch.nn.functional as F
from dataclasses import dataclass
from torch import nn
from peftspec import Method, hookimpl, option, selectors


@dataclass(frozen=True)
class Opts:
    modules: tuple[str, ...] = selectors(doc="modules")
    scale: float = option(1.0, doc="scale")
    n: int = option(100, doc="spectral coefficients")


class Vec(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.vec = nn.Parameter(torch.zeros(base.out_features))

    def adapter_params(self):
        return {"vec": self.vec}

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.vec


class Scaled(Method):
    name, family, Options = "scaled", "augment", Opts

    def check(self, module, step):
        if step.options.scale == 0:
            raise ValueError("scale must be nonzero")
        if step.options.n > module.in_features * module.out_features:
            return f"n = {step.options.n} exceeds in*out of this module"
        return None

    def count_params(self, module, step):
        return module.out_features

    def apply(self, module, step):
        if step.options.scale < 0:
            raise ValueError("a negative scale cannot apply here")
        if step.options.scale > 10:
            return {}["scale"]
        return Vec(module)


@hookimpl
def register_methods(register):
    register(Scaled())
'''


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "peftspec_scaled").mkdir()
    (site / "peftspec_scaled" / "__init__.py").write_text(PLUGIN)
    info = site / "peftspec_scaled-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peftspec-scaled\n"
                                   "Version: 0.0.1\n")
    (info / "entry_points.txt").write_text("[peftspec]\nscaled = peftspec_scaled\n")
    env = {k: v for k, v in os.environ.items() if k != "PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")]),
               COLUMNS="300")

    def run(*args):
        res = subprocess.run([sys.executable, "-c", "from peftspec.cli import main; main()",
                              *map(str, args)], capture_output=True, text=True, env=env,
                             cwd=REPO)
        return res.returncode, " ".join((res.stdout + res.stderr).split())

    return run


def _spec(tmp_path, scale, n=10):
    p = tmp_path / "spec.toml"
    p.write_text(textwrap.dedent(f"""\
        [[augment]]
        method = "scaled"
        modules = ["**.v_proj"]
        n = {n}
        scale = {scale}
        """))
    return p


def test_cli_check_plan_and_apply_agree_on_a_refusal_from_check(cli, tmp_path):
    p = _spec(tmp_path, 0)
    want = (f"{p}:5: augment[0].scale: plugin 'peftspec-scaled', method 'scaled' refused "
            "'blocks.0.attn.v_proj' (Linear) in check: scale must be nonzero")
    for args in (("check", p, "--model", "default"), ("plan", p),
                 ("apply", p, "--out", tmp_path / "a.safetensors")):
        code, text = cli(*args)
        assert code == 2 and want in text, (args, text)
        assert "Traceback" not in text
    assert not (tmp_path / "a.safetensors").exists()
    code, text = cli("check", p)  # no model: what needs one is left to plan, as it says
    assert code == 0 and "ok" in text


def test_cli_an_options_error_points_at_the_options_line(cli, tmp_path):
    p = _spec(tmp_path, 1.0, n=100000)
    code, text = cli("plan", p)
    assert code == 2 and f"{p}:4: augment[0].n: method 'scaled' cannot apply" in text, text


@pytest.mark.parametrize("scale, code, words", [
    (-1.0, 2, "refused on 'blocks.0.attn.v_proj' in apply: a negative scale cannot apply"),
    (11.0, 3, "failed in apply on 'blocks.0.attn.v_proj': KeyError: 'scale'"),
])
def test_cli_apply_names_the_plugin_and_exits_by_kind(cli, tmp_path, scale, code, words):
    p = _spec(tmp_path, scale)
    got, text = cli("apply", p, "--out", tmp_path / "a.safetensors")
    assert got == code, text
    assert f"plugin 'peftspec-scaled', method 'scaled' (augment[0], {p}:1)" in text
    assert words in text and "Traceback" not in text
    assert not (tmp_path / "a.safetensors").exists()


def _hook_setup(**hooks):
    reg = peftspec.build_registry(autoload=False, plugins=[plugin(Good(), **hooks)])
    model = tiny()
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids).logits
    spec = peftspec.parse_spec(_rule(Good.name), file="s.toml", registry=reg)
    return reg, model, ids, out, spec


def test_a_bug_in_an_after_apply_hook_names_the_plugin_and_rolls_back():
    @peftspec.hookimpl
    def after_apply(model, plan):
        return {}["hook-state"]

    reg, model, ids, out, spec = _hook_setup(after_apply=after_apply)
    snap = snapshot(model)
    with pytest.raises(peftspec.PluginError) as exc:
        peftspec.apply(spec, model, registry=reg)
    msg = str(exc.value)
    assert exc.value.exit_code == 3 and isinstance(exc.value.__cause__, KeyError)
    assert f"plugin '{DIST}'" in msg and "hook after_apply, spec s.toml" in msg, msg
    assert "KeyError: 'hook-state'" in msg
    assert_unchanged(model, snap, ids, out)


@pytest.mark.parametrize("error, kind, code, words", [
    (ValueError("two rules overlap"), peftspec.PluginInputError, 2, "refused: two rules"),
    (RuntimeError("oops"), peftspec.PluginError, 3, "failed: RuntimeError: oops"),
])
def test_an_exception_from_a_check_plan_hook_names_the_plugin(error, kind, code, words):
    @peftspec.hookimpl
    def check_plan(plan):
        raise error

    reg, model, ids, out, spec = _hook_setup(check_plan=check_plan)
    for run in (lambda: peftspec.compile_plan(spec, model, registry=reg),
                lambda: peftspec.apply(spec, model, registry=reg)):
        with pytest.raises(kind) as exc:
            run()
        msg = str(exc.value)
        assert exc.value.exit_code == code and exc.value.__cause__ is error
        assert f"plugin '{DIST}'" in msg and "hook check_plan, spec s.toml" in msg
        assert words in msg, msg
    assert not peftspec.is_patched(model)
