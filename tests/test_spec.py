"""The spec format: parsing, validation messages, selectors, compile errors."""

from __future__ import annotations

import textwrap

import pytest

import peftspec
from peftspec.core.matching import parse_selector
from peftspec.core.tomlpos import LineMap


def parse(text: str, registry, file="s.toml"):
    return peftspec.parse_spec(textwrap.dedent(text), file=file, registry=registry)


def problems(text: str, registry) -> list[str]:
    with pytest.raises(peftspec.SpecError) as exc:
        parse(text, registry)
    return [str(p) for p in exc.value.problems]


def test_valid_spec_types_and_defaults(registry):
    spec = parse("""
        [spec]
        name = "x"
        [[train]]
        params = ["**.bias"]
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj"]
        r = 4
        alpha = 8
        """, registry)
    assert spec.name == "x"
    train, lora = spec.rules
    assert (train.family, train.method, train.line) == ("train", "select", 4)
    assert lora.options.r == 4 and lora.options.alpha == 8.0 and lora.options.init == "zeros"
    assert isinstance(lora.options.alpha, float)
    assert lora.where == "reparameterize[0]" and lora.line == 6


def test_all_problems_reported_at_once_with_lines_and_hints(registry):
    msgs = problems("""
        [spec]
        nme = "typo"
        [[reparameterize]]
        method = "lorra"
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj"]
        rr = 8
        alpha = "sixteen"
        dora = 1
        [trian]
        """, registry)
    assert "s.toml:3: spec.nme: unknown key 'nme' (did you mean 'name'?)" in msgs
    assert "s.toml:5: reparameterize[0].method: unknown method 'lorra' (did you mean 'lora'?)" \
        in msgs
    assert "s.toml:9: reparameterize[1].rr: unknown key 'rr' (did you mean 'r'?)" in msgs
    assert "s.toml:10: reparameterize[1].alpha: expected a number, got 'sixteen'" in msgs
    assert "s.toml:11: reparameterize[1].dora: expected true or false, got 1" in msgs
    assert any(m.startswith("s.toml:12: trian: unknown section") and "'train'" in m
               for m in msgs)
    assert len(msgs) == 6


def test_toml_syntax_error_has_line_and_column(registry):
    msgs = problems("""
        [[reparameterize]]
        method = "lora"
        r = = 8
        """, registry)
    assert len(msgs) == 1
    assert msgs[0].startswith("s.toml:4: TOML syntax error at column")


@pytest.mark.parametrize("body, expected", [
    ('[[reparameterize]]\nmodules = ["a"]', "missing key 'method'"),
    ('[reparameterize]\nmethod = "lora"', "write [[reparameterize]]"),
    ('[[prefix]]\nmethod = "x"', "write [prefix] as one table"),
    ('[[reparameterize]]\nmethod = "lora"', "missing required key 'modules'"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = ["a"]\nr = 0', "must be at least 1"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = ["a"]\ninit = "xavier"',
     "expected 'zeros' or 'gaussian'"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = ["re:(unclosed"]',
     "invalid regular expression"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = "**.q"', "expected a list of strings"),
    ('[[reparameterize]]\nmethod = "select"\nmodules = ["a"]', "belongs in [[train]]"),
    ('[[train]]\nparams = ["**.bias"]\nexclude = "x"', "expected a list of selector strings"),
    ('[[train]]\nparams = ["type:"]', "must name a class"),
])
def test_single_mistakes(registry, body, expected):
    msgs = problems(body, registry)
    assert any(expected in m for m in msgs), msgs
    assert all(m.startswith("s.toml:") for m in msgs)


def test_bad_selector_in_multiline_array_points_at_its_line(registry):
    msgs = problems("""
        [[reparameterize]]
        method = "lora"
        modules = [
          "**.q_proj",
          "re:[oops",
        ]
        """, registry)
    assert msgs[0].startswith("s.toml:6: reparameterize[0].modules:")


def test_load_spec_missing_file(tmp_path, registry):
    with pytest.raises(peftspec.SpecError, match="no such file"):
        peftspec.load_spec(tmp_path / "nope.toml", registry=registry)


@pytest.mark.parametrize("selector, name, hit", [
    ("**.bias", "bias", True),
    ("**.bias", "a.b.bias", True),
    ("*.bias", "a.b.bias", False),
    ("a.*.c", "a.x.c", True),
    ("a.*.c", "a.x.y.c", False),
    ("a.**", "a", True),
    ("a.**", "a.b.c", True),
    ("a.**", "ab", False),
    ("a.**.c", "a.c", True),  # ** may match zero names, as in gitignore
    ("a.**.c", "a.x.y.c", True),
    ("blocks.?.attn", "blocks.3.attn", True),
    ("blocks.?.attn", "blocks.12.attn", False),
    ("re:blocks\\.(1[0-9])\\..*", "blocks.12.mlp", True),
    ("re:blocks\\.(1[0-9])\\..*", "blocks.2.mlp", False),
    ("re:mlp", "blocks.2.mlp", False),  # whole-name match
])
def test_glob_and_regex_selectors(selector, name, hit):
    assert parse_selector(selector).matches(name) is hit


def test_type_selector_matches_base_classes():
    from torch import nn

    class MyLinear(nn.Linear):
        pass

    sel = parse_selector("type:Linear")
    from peftspec.core.matching import class_names
    assert sel.matches("x", class_names(MyLinear(2, 2)))
    assert not sel.matches("x", class_names(nn.LayerNorm(2)))


def test_linemap_handles_inline_tables_and_multiline_strings():
    text = '[spec]\ndescription = """\n[[fake]]\nr = 1\n"""\n[[augment]]\ninit = { text = "a" }\n'
    lines = LineMap(text)
    assert lines.line_of(("augment", 0, "init", "text")) == 7
    assert ("fake", 0) not in lines.lines
    assert lines.line_of(("augment", 0)) == 6


# --- compile-time problems (need a model) -------------------------------------------

def compile_problems(text, model, registry):
    spec = parse(text, registry)
    with pytest.raises(peftspec.SpecError) as exc:
        peftspec.compile_plan(spec, model, registry=registry)
    return [str(p) for p in exc.value.problems]


def test_selector_matching_nothing_is_an_error_with_a_hint(tiny_gpt, registry):
    msgs = compile_problems("""
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj", "**.v_projj"]
        """, tiny_gpt, registry)
    # the line of the `modules` key, and a hint in the selector's own form
    assert msgs == ["s.toml:4: reparameterize[0].modules: selector '**.v_projj' matched no "
                    "module (did you mean '**.v_proj'?)"]


def test_optional_rule_tolerates_unmatched_selectors(tiny_gpt, registry):
    spec = parse("""
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj", "**.nothing_here"]
        optional = true
        """, registry)
    plan = peftspec.compile_plan(spec, tiny_gpt, registry=registry)
    assert [s.target for s in plan.steps] == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]


def test_a_rule_whose_exclude_removes_every_match_is_an_error(tiny_gpt, registry):
    # the same error as a selector that matches nothing: the rule would do nothing
    msgs = compile_problems("""
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj"]
        exclude = ["blocks.*.attn.q_proj"]
        """, tiny_gpt, registry)
    assert msgs == ["s.toml:5: reparameterize[0].exclude: every module this rule's selectors "
                    "match (2: 'blocks.0.attn.q_proj', 'blocks.1.attn.q_proj') is removed by "
                    "its own 'exclude'; the rule would change nothing (narrow 'exclude' or the "
                    "selectors, or set 'optional = true' to allow an empty rule)"]
    msgs = compile_problems("""
        [[train]]
        params = ["**.bias"]
        exclude = ["**"]
        """, tiny_gpt, registry)
    assert len(msgs) == 1 and msgs[0].startswith("s.toml:4: train[0].exclude: every parameter")


def test_type_linear_minus_lm_head_on_gpt2_is_that_error(registry):
    # GPT-2's projections are Conv1D: `type:Linear` there is lm_head alone
    pytest.importorskip("transformers")
    from hf_tiny import gpt2

    msgs = compile_problems("""
        [[reparameterize]]
        method = "lora"
        modules = ["type:Linear"]
        exclude = ["lm_head"]
        """, gpt2(), registry)
    assert len(msgs) == 1 and msgs[0].startswith(
        "s.toml:5: reparameterize[0].exclude: every module this rule's selectors match "
        "(1: 'lm_head')")


def test_an_optional_rule_may_exclude_every_match(tiny_gpt, registry):
    spec = parse("""
        [[reparameterize]]
        method = "lora"
        modules = ["**.v_proj"]

        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj"]
        exclude = ["**.q_proj"]
        optional = true
        """, registry)
    plan = peftspec.compile_plan(spec, tiny_gpt, registry=registry)
    assert [s.target for s in plan.steps] == ["blocks.0.attn.v_proj", "blocks.1.attn.v_proj"]


def test_lora_on_layernorm_is_refused(tiny_gpt, registry):
    msgs = compile_problems("""
        [[reparameterize]]
        method = "lora"
        modules = ["blocks.0.ln1"]
        """, tiny_gpt, registry)
    assert len(msgs) == 1 and "cannot apply to 'blocks.0.ln1' (LayerNorm)" in msgs[0]
    assert msgs[0].startswith("s.toml:2:")


def test_two_reparameterizations_of_one_module_conflict(tiny_gpt, registry):
    msgs = compile_problems("""
        [[reparameterize]]
        method = "lora"
        modules = ["**.attn.*_proj"]
        [[reparameterize]]
        method = "lora"
        modules = ["blocks.1.attn.q_proj"]
        """, tiny_gpt, registry)
    assert msgs == ["s.toml:5: reparameterize[1]: module 'blocks.1.attn.q_proj' is already "
                    "reparameterized by reparameterize[0] (line 2); one module takes one "
                    "reparameterization (narrow one rule with 'exclude')"]


def test_exclude_and_order(tiny_gpt, registry):
    spec = parse("""
        [[train]]
        params = ["type:LayerNorm"]
        exclude = ["blocks.0.**"]
        [[reparameterize]]
        method = "lora"
        modules = ["**.v_proj", "**.q_proj"]
        exclude = ["blocks.0.**"]
        """, registry)
    plan = peftspec.compile_plan(spec, tiny_gpt, registry=registry)
    assert [(s.family, s.target) for s in plan.steps] == [
        ("reparameterize", "blocks.1.attn.q_proj"), ("reparameterize", "blocks.1.attn.v_proj"),
        ("train", "blocks.1.ln1.weight"), ("train", "blocks.1.ln1.bias"),
        ("train", "blocks.1.ln2.weight"), ("train", "blocks.1.ln2.bias"),
        ("train", "ln_f.weight"), ("train", "ln_f.bias")]
    d = 32
    assert plan.params_added == 2 * 8 * (d + d)
    assert plan.trainable_params == plan.params_added + 6 * d
