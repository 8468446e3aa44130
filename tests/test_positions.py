"""Selector problems cite the line that holds the selector, and hints keep the
selector's form (a glob stays a glob)."""

from __future__ import annotations

import textwrap
import types
from dataclasses import dataclass, replace

import pytest

import peftspec
from peftspec import Method, hookimpl, option, selectors


def problems(text, model, registry) -> list[str]:
    spec = peftspec.parse_spec(textwrap.dedent(text), file="s.toml", registry=registry)
    with pytest.raises(peftspec.SpecError) as exc:
        peftspec.compile_plan(spec, model, registry=registry)
    return [str(p) for p in exc.value.problems]


def test_the_line_of_the_selector_not_of_the_rule(tiny_gpt, registry):
    msgs = problems("""\
        [[train]]
        params = ["**.bias"]

        [[reparameterize]]
        method = "lora"
        r = 4
        modules = [
            "**.q_proj",
            "**.v_prj",
        ]
        exclude = ["blocks.7.**"]
        """, tiny_gpt, registry)
    assert sorted(msgs) == sorted([
        "s.toml:9: reparameterize[0].modules: selector '**.v_prj' matched no module "
        "(did you mean '**.v_proj'?)",
        "s.toml:11: reparameterize[0].exclude: selector 'blocks.7.**' matched no module "
        "(no modules name ends like that; `peftspec plan` lists names, e.g. tok_emb, "
        "pos_emb, drop, blocks, blocks.0, blocks.0.ln1)",
    ])


@pytest.mark.parametrize("selector, hint", [
    ("**.v_prj", "did you mean '**.v_proj'?"),
    ("blocks.*.atn.v_proj", "did you mean 'blocks.*.attn.v_proj'?"),
    ("blocks.0.attn.q_prj", "did you mean 'blocks.0.attn.q_proj'?"),
    ("**.mpl.up_proj", "did you mean '**.mlp.up_proj'?"),
    ("type:Linaer", "did you mean 'type:Linear'?"),
])
def test_hints_keep_the_selectors_form(tiny_gpt, registry, selector, hint):
    (msg,) = problems(f"""\
        [[reparameterize]]
        method = "lora"
        modules = ["{selector}"]
        """, tiny_gpt, registry)
    assert msg.startswith("s.toml:3: reparameterize[0].modules:")
    assert msg.endswith(f"({hint})")


def test_parameter_selectors_too(tiny_gpt, registry):
    (msg,) = problems("""\
        [[train]]
        params = ["blocks.*.ln1.biass"]
        """, tiny_gpt, registry)
    assert msg == ("s.toml:2: train[0].params: selector 'blocks.*.ln1.biass' matched no "
                   "parameter (did you mean 'blocks.*.ln1.bias'?)")


@dataclass(frozen=True)
class PresetOptions:
    modules: tuple[str, ...] = selectors(required=False, doc="modules")
    preset: bool = option(False, doc="pick the modules myself")


class Preset(Method):
    name, family, Options = "preset-demo", "augment", PresetOptions

    def resolve_options(self, options, model):
        return replace(options, modules=("no.such.module",)) if options.preset else options


def test_a_preset_expanded_selector_falls_back_to_the_rules_line(tiny_gpt):
    plugin = types.ModuleType("preset_demo")
    plugin.register_methods = hookimpl(lambda register: register(Preset()))
    reg = peftspec.build_registry(autoload=False, plugins=[plugin])
    (msg,) = problems("""\
        [spec]
        name = "x"

        [[augment]]
        method = "preset-demo"
        preset = true
        """, tiny_gpt, reg)
    # the selector is nowhere in the text: the rule's own line
    assert msg.startswith("s.toml:4: augment[0].modules: selector 'no.such.module'")
