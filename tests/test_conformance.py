"""The conformance kit (``peftspec.testing``) on the built-in methods, on the IA3
example plugin (from its source folder, not installed), and on broken plugins,
each of which must fail the check that describes its fault."""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftspec import Method, hookimpl, option, selectors
from peftspec.testing import CHECKS, ConformanceError, check_method

REPO = Path(__file__).resolve().parents[1]

BUILTIN = {
    "lora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.v_proj"]\n'
            'r = 4\nalpha = 8',
    "rslora+dora": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.o_proj"]\nr = 2\n'
                   'rslora = true\ndora = true',
    "lora-embedding": '[[reparameterize]]\nmethod = "lora"\nmodules = ["pos_emb"]\nr = 2',
    "bottleneck": '[[augment]]\nmethod = "bottleneck"\nafter = ["**.mlp"]\nsize = 8\n'
                  'layer_norm = true',
    "parallel-adapter": '[[augment]]\nmethod = "bottleneck"\nparallel_to = ["**.mlp"]\n'
                        'size = 4',
    "bitfit": '[[train]]\nparams = ["**.bias"]',
    "prompt-tuning": '[prefix]\nmethod = "prompt-tuning"\ntokens = 3',
    "p-tuning": '[prefix]\nmethod = "p-tuning"\ntokens = 2\nencoder = "lstm"',
    "prefix-tuning": '[prefix]\nmethod = "prefix-tuning"\ntokens = 2\nprojection = true',
    "mixed": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\nr = 2\n'
             '[[augment]]\nmethod = "bottleneck"\nafter = ["**.mlp"]\nsize = 4',
    "ia3": '[[augment]]\nmethod = "ia3"\nmodules = ["**.k_proj", "**.up_proj"]\n'
           'feedforward = ["**.up_proj"]',
    "adalora": '[[reparameterize]]\nmethod = "adalora"\nmodules = ["**.q_proj", "**.o_proj"]\n'
               'init_r = 4\ntarget_r = 2',
    "lora-pissa": '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.up_proj"]\n'
                  'r = 2\ninit = "pissa"',
    "trainable-tokens": '[[reparameterize]]\nmethod = "trainable-tokens"\nmodules = ["tok_emb"]\n'
                        'token_indices = [1, 5, 200]',
    "loha": '[[reparameterize]]\nmethod = "loha"\nmodules = ["**.q_proj", "**.v_proj"]\n'
            'r = 2\nalpha = 4',
    "lokr": '[[reparameterize]]\nmethod = "lokr"\nmodules = ["**.q_proj", "**.up_proj"]\n'
            'r = 2\ndecompose_both = true',
    "vera": '[[reparameterize]]\nmethod = "vera"\nmodules = ["**.q_proj", "**.up_proj"]\n'
            'r = 8',
    "vera-nosave": '[[reparameterize]]\nmethod = "vera"\nmodules = ["**.v_proj"]\nr = 4\n'
                   'save_projection = false',
    "oft": '[[reparameterize]]\nmethod = "oft"\nmodules = ["**.q_proj", "**.down_proj"]\n'
           'block_size = 8',
    "oft-exact": '[[reparameterize]]\nmethod = "oft"\nmodules = ["**.v_proj"]\nblock_size = 0\n'
                 'r = 4\ncayley_neumann = false\nblock_share = true',
}

# what each case must skip (everything else must pass)
SKIPS = {
    "lora": set(), "rslora+dora": set(), "lora-embedding": set(),
    "bottleneck": {"merge", "hf_peft"}, "parallel-adapter": {"merge", "hf_peft"},
    "bitfit": {"rows", "hf_peft"},
    "prompt-tuning": {"unchanged_at_apply", "merge"},
    "p-tuning": {"unchanged_at_apply", "merge"},
    "prefix-tuning": {"unchanged_at_apply", "merge", "rows"},
    "mixed": {"merge", "hf_peft"},  # bottleneck: neither merges nor exports
    "ia3": set(),
    "adalora": set(),
    # the built-in model ties its head to the embedding: merge refuses, as it should
    "trainable-tokens": {"merge"},
    # the residual rounds; other rows of a batch cannot share a rewritten base weight
    "lora-pissa": {"unchanged_at_apply", "rows"},
    "loha": set(), "lokr": set(), "vera": set(), "vera-nosave": set(), "oft": set(),
    "oft-exact": set(),
}
# no built-in method registers a buffer: the kit's buffers check has nothing to hold
SKIPS = {case: skips | {"buffers"} for case, skips in SKIPS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BUILTIN))
def test_builtin_methods_conform(case):
    report = check_method(None, BUILTIN[case])
    assert [r.check for r in report.results] == list(CHECKS)
    skipped = {r.check for r in report.results if r.status == "skipped"}
    assert skipped == SKIPS[case], str(report)


def ia3_plugin():
    path = REPO / "examples" / "peftspec-ia3" / "peftspec_ia3" / "plugin.py"
    spec = importlib.util.spec_from_file_location("ia3_conformance_plugin", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# the example registers its copy of (IA)^3 as "ia3-example": "ia3" is the built-in's
IA3_RULE = '[[augment]]\nmethod = "ia3-example"\nmodules = [{m}]\nfeedforward = [{f}]'


def test_ia3_example_conforms_on_the_builtin_model():
    report = check_method(ia3_plugin(), IA3_RULE.format(m='"**.v_proj", "**.down_proj"',
                                                        f='"**.down_proj"'))
    assert {r.check for r in report.results if r.status == "passed"} == set(CHECKS) - {"buffers"}


@pytest.mark.slow
def test_ia3_example_conforms_on_gpt2_and_agrees_with_peft():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")

    def gpt2():
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                      n_positions=64, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)

    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    report = check_method(ia3_plugin(), IA3_RULE.format(m='"**.c_attn", "**.mlp.c_proj"',
                                                        f='"**.mlp.c_proj"'),
                          model=gpt2, inputs={"input_ids": ids})
    assert report.status("hf_peft") == "passed"
    hf = next(r for r in report.results if r.check == "hf_peft")
    assert "PeftModel.from_pretrained agrees" in hf.detail


# -- broken plugins: each fails its check --------------------------------------------

@dataclass(frozen=True)
class VecOptions:
    modules: tuple[str, ...] = selectors(doc="Linear modules")
    init: float = option(0.0, doc="initial value of the vector")


class Vec(nn.Module):
    def __init__(self, base, init, use=True, hook=False):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.vec = nn.Parameter(torch.full((base.out_features,), init))
        self.use = use

    def adapter_params(self):
        return {"vec": self.vec}

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        return out + self.vec if self.use else out


class VecMethod(Method):
    name, family, Options = "vec", "augment", VecOptions
    unchanged_at_apply = True
    mergeable = True
    use = True

    def count_params(self, module, step):
        return module.out_features

    def apply(self, module, step):
        return Vec(module, step.options.init, self.use)

    def merge(self, installed, original):
        with torch.no_grad():
            original.bias.add_(installed.vec)
        return original


class ClaimsButChanges(VecMethod):
    pass  # the rule sets init = 0.5 while the method claims unchanged_at_apply


class Unused(VecMethod):
    use = False


class BadMerge(VecMethod):
    def merge(self, installed, original):
        with torch.no_grad():
            original.bias.add_(2 * installed.vec)
        return original


class Cloning(VecMethod):
    def apply(self, module, step):
        clone = nn.Linear(module.in_features, module.out_features)
        clone.load_state_dict(module.state_dict())
        return Vec(clone, step.options.init)


class HookNoDetach(VecMethod):
    """Patches in place with a forward hook and never removes it."""

    def count_params(self, module, step):
        return 0

    def apply(self, module, step):
        module.register_forward_hook(lambda m, a, out: out * 1.5)
        return module


def plugin_of(method):
    mod = types.ModuleType("broken_plugin")
    mod.register_methods = hookimpl(lambda register: register(method))
    mod.__peftspec_dist__ = "peftspec-broken"
    return mod


RULE = '[[augment]]\nmethod = "vec"\nmodules = ["**.v_proj"]\n'


@pytest.mark.parametrize("method, rule_extra, check, words", [
    (ClaimsButChanges(), "init = 0.5", "unchanged_at_apply", "outputs changed at apply"),
    (Unused(), "", "frozen_base", "training changed no adapter parameter"),
    (BadMerge(), "", "merge", "merged outputs differ from unmerged"),
    (Cloning(), "", "apply", "no longer in the model"),
    (HookNoDetach(), "", "remove", "outputs differ from the base"),
])
def test_a_broken_plugin_fails_the_check_that_describes_it(method, rule_extra, check, words):
    with pytest.raises(ConformanceError) as exc:
        check_method(plugin_of(method), RULE + rule_extra)
    failed = {r.check: r for r in exc.value.report.failures}
    assert check in failed, str(exc.value)
    assert words in failed[check].detail
    assert "peftspec-broken" in failed[check].detail or check != "apply"


def test_the_well_behaved_vec_plugin_passes():
    report = check_method(plugin_of(VecMethod()), RULE)
    assert not report.failures and report.status("merge") == "passed"


# issue 27, point 3: once a check fails, every later one runs or is skipped with
# the reason; none crashes on state the failed one never set
_LORA = '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n'


@pytest.mark.parametrize("failing", ["count_params", "unchanged_at_apply", "frozen_base",
                                     "modules", "save_load", "buffers", "switching", "rows",
                                     "remove", "merge"])
def test_every_check_runs_or_is_skipped_with_a_reason_after_a_failure(failing, monkeypatch):
    from peftspec.testing import CHECKS, check_method
    from peftspec.testing.checks import Checks

    def broken(self):
        raise RuntimeError(f"{failing} broke")

    monkeypatch.setattr(Checks, failing, broken)
    report = check_method(None, _LORA, raise_on_failure=False)
    by_name = {r.check: r for r in report.results}
    assert list(by_name) == list(CHECKS) and len(report.results) == len(CHECKS)
    assert [r.check for r in report.failures] == [failing]
    assert f"{failing} broke" in by_name[failing].detail
    for r in report.results:
        assert "AttributeError" not in r.detail, r
        if r.status == "skipped":
            assert r.detail, r
    needs = {"frozen_base": {"save_load", "buffers", "switching", "rows", "merge", "hf_peft"},
             "save_load": {"buffers", "switching", "rows", "merge", "hf_peft"},
             "switching": {"rows"}}
    for later in needs.get(failing, ()):
        assert by_name[later].status == "skipped"
        assert "needs " in by_name[later].detail and failing in by_name[later].detail


def test_a_plugin_that_writes_its_base_in_place_fails_at_apply_and_nothing_crashes():
    """The framework refuses the apply (issue 27, point 2); the kit reports it
    as the apply's failure, naming the fault, and skips every check after it."""
    import torch
    from peftspec import hookimpl
    from peftspec.testing import CHECKS, check_method
    from peftspec_plugins.ia3 import IA3

    class InPlace(IA3):
        name = "ia3-in-place"

        def apply(self, module, step):
            with torch.no_grad():
                module.weight.add_(1e-3)
            return super().apply(module, step)

    mod = types.ModuleType("inplace_plugin")
    mod.register_methods = hookimpl(lambda register: register(InPlace()))
    report = check_method(mod, '[[augment]]\nmethod = "ia3-in-place"\nmodules = ["**.v_proj"]',
                          raise_on_failure=False)
    (fail,) = report.failures
    assert fail.check == "apply" and "in place" in fail.detail and "ia3-in-place" in fail.detail
    assert [r.check for r in report.results[1:]] == list(CHECKS)
    assert all(r.status == "skipped" and "needs apply" in r.detail for r in report.results[1:])
