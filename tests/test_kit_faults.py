"""Issue 27's closing requirement: the conformance kit, run on a plugin with each
of the issue's faults, reports a failure whose message names the fault, and
crashes on none: every check runs or is skipped with its reason."""

from __future__ import annotations

import pytest
import torch

from peftspec.testing import CHECKS, check_method
from test_buffers import Drawn
from test_plugin_errors import ApplyBug, ApplyRefuses, BadMerge, BadOptions, CheckRefuses
from test_promise import Good, Wrapped, plugin
from test_promise_values import AddsInPlace


class DetachBug(Good):
    """Swaps the module, and its detach (switching the adapter off) fails."""
    name = "detach-bug"

    def detach(self, installed, original, step):
        raise RuntimeError("detach broke")


class BufferOnTheBase(Good):
    name = "base-buffer-kit"

    def apply(self, module, step):
        module.register_buffer("scratch", torch.zeros(3))
        return Wrapped(module.weight, module.bias, module.out_features)


WHO = "plugin 'peftspec-broken', method '{}'"


@pytest.mark.parametrize("method, check, words", [
    # point 2: a frozen base weight written in place during apply
    (AddsInPlace(), "apply", ["tried to write frozen base tensor", "refused the write"]),
    # point 4: a refusal from check, one from apply, and bugs in apply, merge, detach,
    # and in the options class
    (CheckRefuses(), "apply", ["SpecError", "refused", "in check: scale must be nonzero"]),
    (ApplyRefuses(), "apply", ["PluginInputError", "refused on", "in apply"]),
    (ApplyBug(), "apply", ["PluginError", "failed in apply", "KeyError: 'lookup'"]),
    (BadOptions(), "apply", ["its options class BuggyOpts failed: KeyError: 'size'"]),
    (BadMerge(), "merge", ["failed in merge", "merge broke"]),
    (DetachBug(), "switching", ["failed in detach", "detach broke"]),
    # point 6: a buffer that does not round-trip, and one on a base module
    (Drawn(), "buffers", ["non-persistent buffer 'blocks.0.attn.v_proj.basis' differs"]),
    (BufferOnTheBase(), "apply", ["registered buffer 'blocks.0.attn.v_proj.scratch'"]),
])
def test_the_kit_names_each_fault_and_crashes_on_none(method, check, words):
    rule = f'[[augment]]\nmethod = "{method.name}"\nmodules = ["**.v_proj"]\n'
    report = check_method(plugin(method), rule, raise_on_failure=False)
    failed = {r.check: r.detail for r in report.failures}
    assert check in failed, str(report)
    for w in words:
        assert w in failed[check], failed[check]
    if check != "buffers":  # (the kit's own finding: it names the buffer)
        assert WHO.format(method.name) in failed[check], failed[check]
    ran = [r.check for r in report.results if r.check in CHECKS]
    assert ran == list(CHECKS), str(report)  # each one reported, once, in order
    for r in report.results:
        assert r.status in ("passed", "failed", "skipped")
        assert r.status != "skipped" or r.detail, r
        assert "AttributeError" not in r.detail, r
