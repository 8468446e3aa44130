"""Plugin loading, and the (IA)³ example plugin installed for real.

``examples/peftspec-ia3`` is installed with pip into a temporary folder once
per session and put on ``sys.path`` for this module only, so it is found the
way any third-party plugin is: through its distribution's ``peftspec`` entry
point. It registers its method as ``ia3-example``, beside the same code as
the built-in ``ia3`` (``plugins/ia3.py``). Both are checked against HF PEFT's
implementation on the built-in default model (``nn.Linear``) and on a tiny
GPT-2 (``Conv1D``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import peftspec
from peftspec.core import registry as plugin_loading

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "peftspec-ia3"
EXAMPLE_METHOD = "ia3-example"  # the example's name; the built-in is "ia3"


# -- installing distributions for real ---------------------------------------------

def pip_install(sources: list[Path], target: Path) -> None:
    """``pip install --target``: a real install, with real dist-info and entry points."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
           "--no-input", "--disable-pip-version-check", "-q", "--target", str(target),
           *map(str, sources)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"pip install failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")


def copy_source(src: Path, dest: Path) -> Path:
    # Build from a copy: setuptools writes build/ and *.egg-info into the tree.
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                             "__pycache__"))
    return dest


def write_dist(root: Path, name: str, package: str, entry_point: str, code: str) -> Path:
    """A minimal distribution whose ``peftspec`` entry point is ``package``."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(textwrap.dedent(code))
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.0.1"

        [project.entry-points.peftspec]
        {entry_point} = "{package}"

        [tool.setuptools]
        packages = ["{package}"]
        """))
    return root


@contextlib.contextmanager
def on_sys_path(path: Path, packages: tuple[str, ...]):
    """Put an installed folder first on ``sys.path``; take it and its modules off after."""
    entry = str(path)
    sys.path.insert(0, entry)
    plugin_loading.reset_registry()
    try:
        yield path
    finally:
        sys.path.remove(entry)
        for mod in [m for m in sys.modules if m.split(".")[0] in packages]:
            del sys.modules[mod]
        plugin_loading.reset_registry()


@pytest.fixture(scope="session")
def ia3_site(tmp_path_factory) -> Path:
    """``examples/peftspec-ia3`` installed with pip, once per session."""
    root = tmp_path_factory.mktemp("ia3")
    target = root / "site"
    pip_install([copy_source(EXAMPLE, root / "src")], target)
    return target


@pytest.fixture(scope="module", autouse=True)
def ia3_installed(ia3_site):
    # On sys.path for this module's tests only, so other modules see the
    # registry they expect.
    with on_sys_path(ia3_site, ("peftspec_ia3",)):
        yield ia3_site


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """Two broken plugin distributions: one fails to import, one misspells a hook."""
    root = tmp_path_factory.mktemp("broken")
    broken = write_dist(root / "broken", "broken-plugin", "broken_plugin", "broken", """\
        raise ImportError("broken_plugin needs the package 'nonexistent_dependency'")
        """)
    typo = write_dist(root / "typo", "typo-plugin", "typo_plugin", "typo", """\
        from peftspec import hookimpl

        @hookimpl
        def register_methodz(register):
            raise AssertionError("a misspelled hook must never be called")
        """)
    target = root / "site"
    pip_install([broken, typo], target)
    return target


@pytest.fixture(scope="module")
def reg(ia3_installed):
    """A registry built with the example plugin on ``sys.path``."""
    return peftspec.build_registry()


# -- models ------------------------------------------------------------------------

def nanogpt() -> nn.Module:
    from peftspec.models.nanogpt import GPT, GPTConfig

    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                  n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


# name -> (factory, vocab size, peftspec selectors, HF PEFT's IA3Config arguments)
MODELS = {
    "nanogpt": (nanogpt, 257, (["**.k_proj", "**.v_proj", "**.down_proj"], ["**.down_proj"]),
                dict(target_modules=["k_proj", "v_proj", "down_proj"],
                     feedforward_modules=["down_proj"])),
    "gpt2": (gpt2, 100, (["**.attn.c_attn", "**.mlp.c_fc", "**.mlp.c_proj"], ["**.mlp.c_proj"]),
             dict(target_modules=["attn.c_attn", "mlp.c_fc", "mlp.c_proj"],
                  feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),  # Conv1D
}


def ia3_rule(modules, feedforward, method="ia3") -> str:
    return textwrap.dedent(f"""\
        [[augment]]
        method = "{method}"
        modules = {json.dumps(modules)}
        feedforward = {json.dumps(feedforward)}
        """)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomize(params: dict[str, nn.Parameter], seed: int) -> None:
    """Give adapter tensors values far from their init (vectors around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(params.items()):
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 1.5 + 0.25)


# -- the registry ------------------------------------------------------------------

def test_registry_lists_ia3_from_its_distribution(reg, ia3_site):
    assert reg.methods["ia3"].dist == "peftspec"  # the built-in, beside the example
    assert not reg.failures
    info = reg.methods[EXAMPLE_METHOD]
    assert info.dist == "peftspec-ia3"
    assert info.method.family == "augment" and info.method.mergeable
    # the pip-installed copy, found through its entry point, not the source tree
    module = sys.modules[type(info.method).__module__]
    assert module.__name__ == "peftspec_ia3.plugin"
    assert Path(module.__file__).resolve().is_relative_to(ia3_site.resolve())
    assert reg.methods["lora"].dist == reg.methods["select"].dist == "peftspec"
    assert {"ia3", EXAMPLE_METHOD} <= set(reg.method_names("augment"))


def test_get_registry_sees_a_plugin_after_reset(ia3_site):
    # ia3_installed reset the cache after putting the plugin on sys.path
    assert peftspec.get_registry().methods[EXAMPLE_METHOD].dist == "peftspec-ia3"


# -- (IA)^3 against HF PEFT ----------------------------------------------------------

@pytest.mark.parametrize("method", ["ia3", EXAMPLE_METHOD])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_ia3_matches_hf_peft(name, method, reg, tmp_path):
    peft = pytest.importorskip("peft")
    factory, vocab, (modules, feedforward), hf_config = MODELS[name]
    model = factory()
    hf = copy.deepcopy(model)
    ids = tokens(vocab)
    base_out = logits(model, ids)
    base_keys = set(model.state_dict())
    base_params = {n: p for n, p in model.named_parameters()}

    spec = peftspec.parse_spec(ia3_rule(modules, feedforward, method), registry=reg)
    plan = peftspec.compile_plan(spec, model, registry=reg)
    assert {s.method for s in plan.steps} == {method}
    targets = [s.target for s in plan.steps]
    ff_targets = {s.target for s in plan.steps if "feedforward" in s.roles}
    assert ff_targets and len(ff_targets) < len(targets)
    peftspec.apply_plan(plan, model, registry=reg)

    # unchanged at apply, bit for bit; base tensors are the same objects, same keys
    assert torch.equal(logits(model, ids), base_out)
    assert set(model.state_dict()) == base_keys | {f"{t}.ia3_l" for t in targets}
    for n, p in model.named_parameters():
        if not n.endswith(".ia3_l"):
            assert p is base_params[n]
    trainable = peftspec.trainable_parameters(model)
    assert set(trainable) == set(peftspec.adapter_params(model)) == \
        {f"{t}.ia3_l" for t in targets}

    # trainable parameter count: as HF PEFT's, and as the plan promised
    hf = peft.inject_adapter_in_model(peft.IA3Config(**hf_config), hf)
    hf_trainable = {n: p for n, p in hf.named_parameters() if p.requires_grad}
    n_hf = sum(p.numel() for p in hf_trainable.values())
    assert sum(p.numel() for p in trainable.values()) == n_hf == plan.trainable_params
    assert {n.rsplit(".ia3_l", 1)[0] for n in hf_trainable} == set(targets)

    # the same (random) vectors in both: the same outputs
    randomize(trainable, seed=1)
    hf_layers = dict(hf.named_modules())
    with torch.no_grad():
        for t in targets:
            theirs = hf_layers[t].ia3_l["default"]
            ours = model.get_submodule(t).ia3_l
            assert theirs.numel() == ours.numel()
            theirs.copy_(ours.reshape(theirs.shape))
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base_out, atol=1e-3)
    torch.testing.assert_close(adapted, logits(hf, ids), atol=1e-5, rtol=0)

    # and the same gradients; the base gets none
    for m in (model, hf):
        m(ids).logits.pow(2).mean().backward()
    for t in targets:
        ours, theirs = model.get_submodule(t).ia3_l.grad, hf_layers[t].ia3_l["default"].grad
        assert ours is not None and ours.abs().sum() > 0
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in base_params.values())

    # save / load onto a fresh base: bit-exact
    path = peftspec.save_adapter(model, tmp_path / "ia3.safetensors")
    fresh = peftspec.load_adapter(factory(), path, registry=reg)
    loaded = peftspec.adapter_params(fresh)
    assert set(loaded) == set(trainable)
    for n, p in trainable.items():
        assert torch.equal(loaded[n], p)
    assert torch.equal(logits(fresh, ids), adapted)

    # merge: same outputs, plain modules, the same base tensors as HF PEFT's merge
    peftspec.merge(model)
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)
    assert not peftspec.is_patched(model)
    assert not peftspec.adapter_params(model)
    assert not [m for m in model.modules() if type(m).__name__ == "IA3Linear"]
    assert set(model.state_dict()) == base_keys
    for n, p in model.named_parameters():
        assert p is base_params[n]
    for t in targets:
        hf_layers[t].merge()
        ours, theirs = model.get_submodule(t), hf_layers[t].get_base_layer()
        assert type(ours) is type(theirs)
        torch.testing.assert_close(ours.weight, theirs.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.bias, theirs.bias, atol=1e-6, rtol=0)


def test_ia3_with_lora_in_one_spec(reg, tmp_path):
    model = nanogpt()
    ids = tokens(257, seed=3)
    base_out = logits(model, ids)
    spec = peftspec.parse_spec("""
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj", "**.o_proj"]
        r = 4
        alpha = 8

        [[augment]]
        method = "ia3"
        modules = ["**.k_proj", "**.v_proj", "**.mlp.*_proj"]
        feedforward = ["**.down_proj"]

        [[train]]
        params = ["ln_f.bias"]
        """, registry=reg)
    plan = peftspec.compile_plan(spec, model, registry=reg)
    blocks = model.blocks
    expected_added = sum(4 * (b.attn.q_proj.in_features + b.attn.q_proj.out_features) +
                         4 * (b.attn.o_proj.in_features + b.attn.o_proj.out_features) +
                         b.attn.k_proj.out_features + b.attn.v_proj.out_features +
                         b.mlp.up_proj.out_features + b.mlp.down_proj.in_features
                         for b in blocks)
    assert plan.params_added == expected_added
    peftspec.apply_plan(plan, model, registry=reg)
    assert torch.equal(logits(model, ids), base_out)

    randomize(peftspec.adapter_params(model), seed=4)
    with torch.no_grad():
        model.ln_f.bias.add_(0.1)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base_out, atol=1e-3)

    path = peftspec.save_adapter(model, tmp_path / "mixed.safetensors")
    fresh = peftspec.load_adapter(nanogpt(), path, registry=reg)
    ours, theirs = peftspec.adapter_params(model), peftspec.adapter_params(fresh)
    assert set(ours) == set(theirs) and any(n.endswith("lora_A") for n in ours)
    for n in ours:
        assert torch.equal(ours[n], theirs[n])
    assert torch.equal(fresh.ln_f.bias, model.ln_f.bias)
    assert torch.equal(logits(fresh, ids), adapted)

    peftspec.merge(model)
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)
    assert not peftspec.adapter_params(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))


# -- compile errors ----------------------------------------------------------------

def compile_problems(text: str, reg, model=None) -> list[str]:
    spec = peftspec.parse_spec(textwrap.dedent(text), registry=reg)
    with pytest.raises(peftspec.SpecError) as exc:
        peftspec.compile_plan(spec, model or nanogpt(), registry=reg)
    return [str(p) for p in exc.value.problems]


def test_feedforward_must_be_a_subset_of_modules(reg):
    msgs = compile_problems("""
        [[augment]]
        method = "ia3"
        modules = ["**.k_proj", "blocks.0.mlp.down_proj"]
        feedforward = ["**.down_proj"]
        """, reg)
    assert len(msgs) == 1
    assert "'blocks.1.mlp.down_proj'" in msgs[0] and "feedforward" in msgs[0]
    assert "blocks.0.mlp.down_proj" not in msgs[0]


@pytest.mark.parametrize("method", ["ia3", EXAMPLE_METHOD])
def test_ia3_refuses_other_modules_and_lora_on_the_same_module(reg, method):
    msgs = compile_problems(f"""
        [[augment]]
        method = "{method}"
        modules = ["blocks.0.ln1"]
        """, reg)
    assert len(msgs) == 1 and "'blocks.0.ln1'" in msgs[0] and "LayerNorm" in msgs[0]

    msgs = compile_problems(f"""
        [[reparameterize]]
        method = "lora"
        modules = ["blocks.1.attn.k_proj"]

        [[augment]]
        method = "{method}"
        modules = ["**.k_proj"]
        """, reg)
    assert len(msgs) == 1
    assert "'blocks.1.attn.k_proj'" in msgs[0] and "lora" in msgs[0]


# -- (IA)^3 on one module, against the formula ---------------------------------------

class One(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


@given(n_in=st.integers(1, 9), n_out=st.integers(1, 9), conv1d=st.booleans(),
       feedforward=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
       method=st.sampled_from(["ia3", EXAMPLE_METHOD]))
def test_ia3_module_is_the_formula(reg, n_in, n_out, conv1d, feedforward, bias, dtype, seed,
                                   method):
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(n_out, n_in)  # bias always; weight stored (in, out)
        nn.init.normal_(layer.bias)
    else:
        layer = nn.Linear(n_in, n_out, bias=bias)
    model = One(layer).to(dtype)
    w = (layer.weight.t() if conv1d else layer.weight).detach().clone()  # (out, in)
    b = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(n_out, dtype=dtype)
    x = torch.randn(3, 2, n_in, dtype=dtype)
    before = model(x).detach()

    rule = ia3_rule(["proj"], ["proj"] if feedforward else [], method)
    plan = peftspec.compile_plan(peftspec.parse_spec(rule, registry=reg), model, registry=reg)
    assert plan.params_added == (n_in if feedforward else n_out)
    peftspec.apply_plan(plan, model, registry=reg)
    assert torch.equal(model(x), before)

    vec = model.proj.ia3_l
    assert vec.shape == (n_in if feedforward else n_out,) and vec.dtype == dtype
    with torch.no_grad():
        vec.copy_(torch.rand(vec.shape, dtype=dtype) * 2 - 0.5)
    l = vec.detach().clone()
    ref = (x * l) @ w.t() + b if feedforward else (x @ w.t() + b) * l
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(model(x).detach(), ref, atol=tol, rtol=tol)

    peftspec.merge(model)
    assert type(model.proj) is type(layer) and model.proj is layer
    torch.testing.assert_close(model(x).detach(), ref, atol=tol, rtol=tol)


# -- loading failures and the autoload switch ----------------------------------------

def test_broken_plugins_are_reported_and_the_rest_work(broken_site, reg):
    with on_sys_path(broken_site, ("broken_plugin", "typo_plugin")):
        registry = peftspec.build_registry()
        with pytest.warns(RuntimeWarning) as warned:  # the cached registry warns
            assert peftspec.get_registry().methods[EXAMPLE_METHOD].dist == "peftspec-ia3"
    assert any("broken-plugin" in str(w.message) for w in warned)
    assert any("typo-plugin" in str(w.message) for w in warned)
    failures = {f.dist: f for f in registry.failures}
    assert {"broken-plugin", "typo-plugin"} <= set(failures)
    broken, typo = failures["broken-plugin"], failures["typo-plugin"]
    assert broken.entry_point == "broken" and "nonexistent_dependency" in broken.error
    assert "broken-plugin" in str(broken)
    assert typo.entry_point == "typo" and "register_methodz" in typo.error
    assert {"lora", "select", "ia3", EXAMPLE_METHOD} <= set(registry.methods)
    assert registry.methods[EXAMPLE_METHOD].dist == "peftspec-ia3"

    model = nanogpt()
    ids = tokens(257)
    base_out = logits(model, ids)
    peftspec.apply(peftspec.parse_spec("""
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj"]
        [[augment]]
        method = "ia3-example"
        modules = ["**.v_proj"]
        [[train]]
        params = ["**.bias"]
        """, registry=registry), model, registry=registry)
    assert torch.equal(logits(model, ids), base_out)
    names = set(peftspec.trainable_parameters(model))
    assert "blocks.0.attn.q_proj.lora_A" in names and "blocks.1.attn.v_proj.ia3_l" in names
    assert "blocks.0.ln1.bias" in names


@pytest.mark.parametrize("value, autoload", [("1", False), ("yes", False), ("0", True),
                                             ("", True)])
def test_disable_autoload_env(monkeypatch, value, autoload):
    monkeypatch.setenv(plugin_loading.DISABLE_ENV, value)
    registry = peftspec.build_registry()
    assert {"lora", "select"} <= set(registry.methods)
    assert {"default", "py", "hf"} <= set(registry.sources)
    assert "ia3" in registry.methods  # a built-in
    assert (EXAMPLE_METHOD in registry.methods) is autoload
    if not autoload:
        with pytest.raises(peftspec.SpecError, match=f"unknown method '{EXAMPLE_METHOD}'"):
            peftspec.parse_spec(ia3_rule(["**.k_proj"], [], EXAMPLE_METHOD), registry=registry)


# -- the command line, in a fresh interpreter -----------------------------------------

def run_cli(*args: str, sites: list[Path], env_extra: dict | None = None):
    env = {k: v for k, v in os.environ.items() if k != plugin_loading.DISABLE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, sites), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "200"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", "from peftspec.cli import main; main()",
                           *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_cli_plugins_lists_ia3_and_failures(ia3_site, broken_site):
    res = run_cli("plugins", "--json", sites=[ia3_site, broken_site])
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    methods = {m["name"]: m for m in data["methods"]}
    assert methods[EXAMPLE_METHOD]["distribution"] == "peftspec-ia3"
    assert methods["ia3"]["distribution"] == "peftspec"
    for name in ("ia3", EXAMPLE_METHOD):
        assert methods[name]["family"] == "augment" and methods[name]["mergeable"] is True
    assert methods["lora"]["distribution"] == "peftspec"
    assert {"broken-plugin", "typo-plugin"} <= {f["distribution"] for f in data["failures"]}
    assert "broken-plugin" in res.stderr  # warned about, too


def test_cli_plan_with_ia3(ia3_site, tmp_path):
    spec = tmp_path / "ia3.toml"
    spec.write_text(ia3_rule(["**.k_proj", "**.v_proj", "**.down_proj"], ["**.down_proj"],
                             EXAMPLE_METHOD))
    res = run_cli("plan", str(spec), "--json", sites=[ia3_site])
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    default = peftspec.load_model()  # what the CLI planned against
    expected = sum(b.attn.k_proj.out_features + b.attn.v_proj.out_features +
                   b.mlp.down_proj.in_features for b in default.blocks)
    assert data["params_added"] == expected
    assert {s["method"] for s in data["steps"]} == {EXAMPLE_METHOD}
    assert len(data["steps"]) == 3 * len(default.blocks)

    res = run_cli("plan", str(spec), sites=[ia3_site],
                  env_extra={plugin_loading.DISABLE_ENV: "1"})
    assert res.returncode == 2 and f"unknown method '{EXAMPLE_METHOD}'" in res.stderr


def test_example_spec_uses_the_builtin(reg):
    spec = peftspec.load_spec(REPO / "specs" / "ia3.toml", registry=reg)
    model = nanogpt()
    plan = peftspec.compile_plan(spec, model, registry=reg)
    d = 32
    assert plan.params_added == 2 * 2 * d + 2 * 4 * d  # k, v: out; down_proj: its input


@pytest.mark.parametrize("columns", ["60", "70", "90", "200"])
def test_cli_plugins_never_drops_a_summary(columns):
    """issue 27, point 7: at any width each method's summary is shown, whole
    (wrapped, in a table or below the entry), never dropped."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": columns, "PEFTSPEC_DISABLE_PLUGIN_AUTOLOAD": "1"}
    res = subprocess.run([sys.executable, "-c", "from peftspec.cli import main; main()",
                          "plugins"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    reg = peftspec.build_registry(autoload=False)
    for name, info in reg.methods.items():
        summary = info.method.summary
        for word in summary.split():  # each word of it is there (wrapping may split lines)
            assert word in res.stdout, (name, word)
