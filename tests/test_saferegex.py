"""Patterns from specs and HF PEFT configs: linear time (RE2), Python's syntax
where RE2 has it, and a clear refusal where it does not."""

from __future__ import annotations

import json
import re
import signal
import textwrap
from contextlib import contextmanager

import pytest
from hypothesis import given, strategies as st
from torch import nn

import peftspec
from peftspec.core.matching import parse_selector
from peftspec.core.saferegex import UnsafePattern, compile_pattern, escape

EVIL = r"([\w.]+)+[!?]"  # exponential in Python's re: x2 per character of the name


@contextmanager
def hang_guard(seconds: int = 20):
    """Turn a hang into a failure (Python's re on EVIL would run for hours)."""
    def boom(*_):
        raise AssertionError(f"still matching after {seconds} s: not linear time")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class LongNames(nn.Module):
    """Module names of 60 characters and more, as deep transformers have."""

    def __init__(self):
        super().__init__()
        inner = nn.ModuleDict({"self_attention_projection_query_" + "x" * 20: nn.Linear(4, 4)})
        self.model_decoder_layers_stack = nn.ModuleList([nn.ModuleDict({"attention": inner})])


def test_pathological_selector_compiles_at_once(registry):
    spec = peftspec.parse_spec(textwrap.dedent(f"""
        [[reparameterize]]
        method = "lora"
        modules = ['re:{EVIL}', "**.attention.**"]
        r = 2
        """), file="evil.toml", registry=registry)
    name = next(n for n, m in LongNames().named_modules() if isinstance(m, nn.Linear))
    assert len(name) > 60
    with hang_guard():
        with pytest.raises(peftspec.SpecError) as exc:  # EVIL matches nothing
            peftspec.compile_plan(spec, LongNames(), registry=registry)
    assert f"selector 're:{EVIL}' matched no module" in str(exc.value)
    with hang_guard():
        assert not compile_pattern(EVIL).fullmatch("a" * 100_000)


@pytest.mark.parametrize("pattern, construct", [
    (r"(a)\1", "backreferences"),
    (r"(?=q)q_proj", "lookahead"),
    (r"(?!lm_head).*", "negative lookahead"),
    (r"(?<=\.)q_proj", "lookbehind"),
    (r".*(?<!head)", "negative lookbehind"),
    (r"(?>a)", "atomic groups"),
    (r"a++", "possessive"),
    (r"q_proj\Z", r"\Z is written \z"),
    (r"a{5000}", "at most {1000}"),
])
def test_unsupported_constructs_are_refused_with_file_line_key(pattern, construct, registry):
    text = textwrap.dedent(f"""\
        [spec]
        name = "x"

        [[reparameterize]]
        method = "lora"
        modules = [
          "**.q_proj",
          're:{pattern}',
        ]
        """)
    with pytest.raises(peftspec.SpecError) as exc:
        peftspec.parse_spec(text, file="s.toml", registry=registry)
    (problem,) = exc.value.problems
    assert str(problem).startswith("s.toml:8: reparameterize[0].modules: selector 're:")
    assert construct in problem.message and "RE2" in problem.message


def test_refusal_through_the_cli_exits_2(tmp_path):
    from click.testing import CliRunner

    from peftspec.cli import cli

    spec = tmp_path / "s.toml"
    spec.write_text('[[reparameterize]]\nmethod = "lora"\nmodules = [\'re:(a)\\1\']\n')
    r = CliRunner().invoke(cli, ["check", str(spec)])
    assert r.exit_code == 2
    assert f"{spec}:3: reparameterize[0].modules" in " ".join(r.output.split())
    assert "backreferences" in r.output


# Python's syntax, on the part RE2 shares: both engines agree on module names.
ATOMS = st.sampled_from(["a", "b", r"\.", ".", r"\d", r"\w", "[ab]", "[^.]", "[0-9]", "_"])


@st.composite
def patterns(draw, depth=0):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if depth < 2 and draw(st.booleans()):
            inner = "|".join(draw(patterns(depth + 1)) for _ in range(draw(st.integers(1, 2))))
            atom = f"(?:{inner})" if draw(st.booleans()) else f"({inner})"
        else:
            atom = draw(ATOMS)
        parts.append(atom + draw(st.sampled_from(["", "*", "+", "?", "{1,2}", "*?"])))
    return "".join(parts)


NAMES = st.text(alphabet="ab._019", max_size=12)


@given(patterns(), NAMES)
def test_re2_agrees_with_python_re(pattern, name):
    py = re.compile(pattern)
    ours = compile_pattern(pattern)
    assert ours.fullmatch(name) == (py.fullmatch(name) is not None)
    assert ours.match(name) == (py.match(name) is not None)


GLOB_PARTS = st.sampled_from(["a", "b", "ab", "*", "**", "?", "0", "1"])


@given(st.lists(GLOB_PARTS, min_size=1, max_size=4), NAMES)
def test_glob_fast_paths_agree_with_the_glob_regex(parts, name):
    """``**.x``/``x.**``/``x`` are string tests; they must answer as the regex does."""
    from peftspec.core.matching import _glob_to_regex

    glob = ".".join(parts)
    sel = parse_selector(glob)
    assert sel.matches(name) == compile_pattern(_glob_to_regex(glob)).fullmatch(name), glob


@given(st.text(max_size=20))
def test_escape_matches_exactly_itself(text):
    p = compile_pattern(escape(text))
    assert p.fullmatch(text)
    assert not p.fullmatch(text + "x")


def test_oversized_pattern_refused():
    with pytest.raises(UnsafePattern, match="longer than"):
        compile_pattern("a" * 5000)


# --- HF PEFT configs -------------------------------------------------------------------

def _hf_folder(tmp_path, **config_changes):
    peft_ = pytest.importorskip("peft")
    from test_hf_format import LLAMA, hf_adapter

    hf = tmp_path / "hf"
    hf_adapter(LLAMA, peft_.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                       task_type="CAUSAL_LM"), hf)
    cfg = hf / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **config_changes}))
    return hf, LLAMA


@pytest.mark.parametrize("change", [
    {"target_modules": EVIL},
    {"exclude_modules": EVIL},
    {"layers_to_transform": [0], "layers_pattern": EVIL, "target_modules": ["q_proj"]},
    {"modules_to_save": [EVIL]},
    {"rank_pattern": {EVIL: 2}},
], ids=["target_modules", "exclude_modules", "layers_pattern", "modules_to_save",
        "rank_pattern"])
def test_hf_config_patterns_are_linear_time(change, tmp_path):
    from peftspec.core.errors import ConversionError

    hf, arch = _hf_folder(tmp_path, **change)
    with hang_guard():
        try:
            peftspec.import_hf_peft(hf, tmp_path / "a.safetensors", model=arch.base())
        except ConversionError as exc:  # e.g. nothing selected: a clear refusal is fine
            assert str(exc)


@pytest.mark.parametrize("key", ["target_modules", "exclude_modules"])
def test_hf_config_lookaround_is_refused_clearly(key, tmp_path):
    from peftspec.core.errors import ConversionError

    hf, arch = _hf_folder(tmp_path, **{key: r"^(?!.*lm_head).*q_proj$"})
    with pytest.raises(ConversionError) as exc:
        peftspec.import_hf_peft(hf, tmp_path / "a.safetensors", model=arch.base())
    assert "adapter_config.json" in str(exc.value)
    assert "negative lookahead" in str(exc.value)
    assert not (tmp_path / "a.safetensors").exists()
