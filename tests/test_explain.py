"""Options that document themselves: ``peftspec plugins METHOD`` / ``explain``,
``--json``, example rules, and ``peftspec schema`` (JSON Schema for editors).

The schema is checked with ``jsonschema`` (a test-only dependency): every spec
in ``specs/`` validates, the bad ones are rejected, and a third-party method
(the IA3 example, loaded from its source folder without installing it) brings
its own options into the schema.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import jsonschema
import pytest
from click.testing import CliRunner

import peftspec
from peftspec import Method, hookimpl, option, selectors
from peftspec.cli import cli
from peftspec.core.explain import describe_options, example_rule
from peftspec.core.schema import spec_schema

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"
BAD_SPECS = {"bad.toml"}


def ia3_plugin():
    """The IA3 example's plugin module, imported from its source file (not installed)."""
    path = REPO / "examples" / "peftspec-ia3" / "peftspec_ia3" / "plugin.py"
    spec = importlib.util.spec_from_file_location("ia3_example_plugin", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through it
    spec.loader.exec_module(mod)
    mod.__peftspec_dist__ = "peftspec-ia3"
    return mod


@dataclass(frozen=True)
class ScaleOptions:
    modules: tuple[str, ...] = selectors(doc="modules whose output is scaled")
    gain: float = option(1.0, doc="initial gain", min=0.0, max=10.0)
    mode: str = option("out", doc="which side")


class Scale(Method):
    name, family, Options = "scale-out", "augment", ScaleOptions
    summary = "a third party's method"


@hookimpl
def register_methods(register):
    register(Scale())


@pytest.fixture(scope="module")
def reg():
    this = sys.modules[__name__]
    return peftspec.build_registry(plugins=[ia3_plugin(), this])


def validator(reg):
    schema = spec_schema(reg)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _messages(errs) -> list[str]:
    """Every message, including those inside a oneOf's branches (what editors list)."""
    out = []
    for e in errs:
        out.append(e.message)
        out += _messages(e.context)
    return out


def errors(v, text: str) -> list[str]:
    return _messages(v.iter_errors(tomllib.loads(textwrap.dedent(text))))


# -- describe_options / example_rule ---------------------------------------------------

def test_lora_options_carry_type_default_bounds_and_doc(reg):
    opts = {o["name"]: o for o in describe_options(reg.method("lora"))}
    assert opts["modules"]["required"] and opts["modules"]["selector"] == "modules"
    assert opts["modules"]["type"] == "a list of module selectors"
    r = opts["r"]
    assert (r["type"], r["default"], r["min"], r["max"]) == ("an integer", 8, 1, None)
    assert r["doc"] == "rank of the update"
    assert opts["dropout"]["max"] == 0.999
    assert opts["init"]["schema"] == {"enum": ["zeros", "gaussian", "pissa", "olora", "eva"],
                                      "default": "zeros",
                                      "description": opts["init"]["doc"]}
    tokens = {o["name"]: o for o in describe_options(reg.method("prompt-tuning"))}["tokens"]
    assert tokens["required"] and tokens["default"] is None


def test_every_methods_example_rule_loads(reg):
    assert {"lora", "bottleneck", "select", "prompt-tuning", "ia3", "ia3-example",
            "scale-out"} <= \
        set(reg.methods)
    for name, info in reg.methods.items():
        text = example_rule(info.method)
        spec = peftspec.parse_spec(text, registry=reg)  # raises SpecError if not
        (rule,) = spec.rules
        assert rule.method == name and rule.family == info.method.family
        assert list(validator(reg).iter_errors(tomllib.loads(text))) == [], name


# -- the command ----------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], terminal_width=70)


def test_cli_plugins_method_prints_every_option_and_an_example():
    for cmd in ("plugins", "explain"):
        res = invoke(cmd, "lora")
        assert res.exit_code == 0, res.output
        out = res.output
        assert "lora  [[reparameterize]], from distribution peftspec; mergeable" in out
        assert "  r: an integer, >= 1, default 8\n      rank of the update" in out
        assert "  dropout: a number, >= 0, <= 0.999, default 0.0" in out
        assert "  modules: a list of module selectors, required" in out
        assert "  init: 'zeros' or 'gaussian' or 'pissa' or 'olora' or 'eva', default \"zeros\"" in out
        assert "  exclude: a list of selectors" in out
        example = out.split("example:\n", 1)[1]
        spec = peftspec.parse_spec(textwrap.dedent(example))
        assert spec.rules[0].method == "lora"


def test_cli_plugins_method_json_carries_the_same():
    res = invoke("plugins", "lora", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["name"] == "lora" and data["distribution"] == "peftspec"
    assert data["section"] == "[[reparameterize]]" and data["mergeable"] is True
    r = {o["name"]: o for o in data["options"]}["r"]
    assert (r["default"], r["min"], r["doc"]) == (8, 1, "rank of the update")
    assert peftspec.parse_spec(data["example"]).rules[0].options.r == 8


def test_cli_plugins_unknown_method_is_bad_input():
    res = invoke("plugins", "lorra")
    assert res.exit_code == 2
    assert "no method named 'lorra' is installed (did you mean 'lora'?)" in res.output


# -- the JSON Schema -----------------------------------------------------------------

def test_every_spec_in_specs_validates_and_bad_ones_are_rejected(reg):
    v = validator(reg)
    files = sorted(SPECS.glob("*.toml"))
    assert len(files) >= 10
    for path in files:
        doc = tomllib.loads(path.read_text())
        errs = _messages(v.iter_errors(doc))
        if path.name in BAD_SPECS:
            assert errs, path
            with pytest.raises(peftspec.SpecError):
                peftspec.load_spec(path, registry=reg)
        else:
            assert errs == [], (path, errs)
            peftspec.load_spec(path, registry=reg)  # and the loader agrees


@pytest.mark.parametrize("text, words", [
    ('[spec]\nnme = "x"', "'nme' was unexpected"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = ["a"]\nrr = 8', "'rr' was unexpected"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = ["a"]\nr = 0', "0 is less than the minimum of 1"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = ["a"]\nr = "8"', "'8' is not of type 'integer'"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = ["a"]\ndropout = 1.5', "1.5 is greater than"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = ["a"]\ninit = "ones"', "'ones' is not one of"),
    ('[[reparameterize]]\nmethod = "lora"', "'modules' is a required property"),
    ('[[reparameterize]]\nmethod = "lora"\nmodules = []', "should be non-empty"),
    ('[[reparameterize]]\nmethod = "lorra"\nmodules = ["a"]', "'lorra' is not one of"),
    ('[[reparameterize]]\nmodules = ["a"]', "'method' is a required property"),
    ('[[augment]]\nmethod = "lora"\nmodules = ["a"]', "'lora' is not one of"),
    ('[[train]]\nparams = ["**.bias"]\nr = 8', "'r' was unexpected"),
    ('[prefix]\nmethod = "prompt-tuning"', "'tokens' is a required property"),
    ('[[augment]]\nmethod = "ia3"\nmodules = ["a"]\nfeedforwad = ["a"]', "'feedforwad' was unexpected"),
    ('[[augment]]\nmethod = "scale-out"\nmodules = ["a"]\ngain = 11', "11 is greater than"),
    ('[train_config]\nbatch_size = 0', "0 is less than the minimum of 1"),
    ('[train_config]\nprecision = "fp16"', "'fp16' is not one of"),
    ('[trian]', "'trian' was unexpected"),
])
def test_the_schema_rejects_what_the_loader_rejects(reg, text, words):
    errs = errors(validator(reg), text)
    assert any(words in e for e in errs), errs
    with pytest.raises(peftspec.SpecError):
        peftspec.parse_spec(text, registry=reg)


def test_the_schema_accepts_defaults_and_documents_options(reg):
    v = validator(reg)
    assert errors(v, '[[train]]\nparams = ["**.bias"]') == []  # method defaults to select
    assert errors(v, '[[augment]]\nmethod = "scale-out"\nmodules = ["a"]\ngain = 2.5') == []
    lora = spec_schema(reg)["definitions"]["method:lora"]["properties"]
    assert lora["r"] == {"type": "integer", "minimum": 1, "description": "rank of the update",
                         "default": 8}
    scale = spec_schema(reg)["definitions"]["method:scale-out"]["properties"]
    assert scale["gain"]["maximum"] == 10.0 and scale["gain"]["description"] == "initial gain"


def test_cli_schema_writes_the_file_and_a_schema_line_is_just_a_comment(tmp_path):
    out = tmp_path / "peftspec.schema.json"
    res = invoke("schema", "--out", out)
    assert res.exit_code == 0, res.output
    schema = json.loads(out.read_text())
    jsonschema.Draft4Validator.check_schema(schema)
    assert "method:lora" in schema["definitions"]
    spec = tmp_path / "s.toml"
    spec.write_text("#:schema ./peftspec.schema.json\n" + (SPECS / "lora.toml").read_text())
    assert jsonschema.Draft4Validator(schema).is_valid(tomllib.loads(spec.read_text()))
    assert peftspec.load_spec(spec).rules
    res = invoke("schema")
    assert json.loads(res.output) == schema
