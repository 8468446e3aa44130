"""``docs/plugins.md`` is run, not just read: its LoHa plugin, taken from the
page word for word, passes the conformance kit, and the README links the page."""

from __future__ import annotations

import re
import sys
import textwrap
import types
from pathlib import Path

import peftspec
from peftspec.testing import check_method

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"


def loha_module() -> types.ModuleType:
    text = DOC.read_text()
    code = re.search(r"```python\n(# my_loha/plugin\.py\n.*?)```", text, re.S).group(1)
    mod = types.ModuleType("my_loha_plugin_from_docs")
    mod.__peftspec_dist__ = "my-loha"
    sys.modules[mod.__name__] = mod  # dataclasses look annotations up through it
    exec(compile(code, str(DOC), "exec"), mod.__dict__)
    return mod


def test_the_guides_loha_plugin_passes_the_conformance_kit():
    plugin = loha_module()
    rule = '[[reparameterize]]\nmethod = "my-loha"\nmodules = ["**.q_proj", "**.v_proj"]\nr = 2'
    report = check_method(plugin, rule)
    passed = {r.check for r in report.results if r.status == "passed"}
    assert {"count_params", "unchanged_at_apply", "frozen_base", "save_load", "switching",
            "rows", "remove", "merge"} <= passed, str(report)
    # and the spec in the guide loads with it
    reg = peftspec.build_registry(autoload=False, plugins=[plugin])
    toml = re.search(r"a spec can say:\n\n```toml\n(.*?)```", DOC.read_text(), re.S).group(1)
    (rule,) = peftspec.parse_spec(textwrap.dedent(toml), registry=reg).rules
    assert rule.method == "my-loha" and rule.options.r == 8
    assert reg.methods["my-loha"].dist == "my-loha"


def test_readme_links_the_guide():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Writing a method plugin", 1)[1].split("\n## ", 1)[0]
    assert "docs/plugins.md" in section
