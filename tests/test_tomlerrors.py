"""TOML syntax errors name the line and column where the broken construct starts."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

import peftspec
from peftspec.core.tomlerrors import open_at, scan


def first_problem(text: str, registry) -> str:
    with pytest.raises(peftspec.SpecError) as exc:
        peftspec.parse_spec(text, file="s.toml", registry=registry)
    (problem,) = exc.value.problems
    return str(problem)


HEAD = '[spec]\nname = "x"\n\n[[reparameterize]]\nmethod = "lora"\n'  # 5 lines


@pytest.mark.parametrize("body, expected", [
    # the case: the array opens on line 6; tomllib stops at line 7
    ('r = [8\nalpha = 16\n', "s.toml:6: TOML syntax error at column 5: unclosed array (no "
                             "matching ']'); the parser stopped at line 7, column 1"),
    ('modules = ["**.q_proj",\n  "**.v_proj"\n', "s.toml:6: TOML syntax error at column 11: "
                                                 "unclosed array"),
    ('modules = [["a"], ["b",\nr = 2\n', "s.toml:6: TOML syntax error at column 19: unclosed "
                                         "array"),
    ('description = "abc\nr = 2\n', "s.toml:6: TOML syntax error at column 15: unclosed "
                                    "string (no matching '\"'); the parser stopped at column 19"),
    ('description = """abc\nr = 2\n', "s.toml:6: TOML syntax error at column 15: unclosed "
                                      "multi-line string (no matching '\"\"\"'); the parser "
                                      "stopped at the end of the file"),
    ("init = { text = 'x'\nr = 2\n", "s.toml:6: TOML syntax error at column 8: unclosed inline "
                                     "table (no matching '}')"),
    ('[[augment]\nmethod = "bottleneck"\n', "s.toml:6: TOML syntax error at column 1: unclosed "
                                            "array-of-tables header (no matching ']]')"),
    ('[train_config\nsteps = 2\n', "s.toml:6: TOML syntax error at column 1: unclosed table "
                                   "header (no matching ']')"),
    # not an unclosed construct: the parser's own position stands
    ('r = = 8\n', "s.toml:6: TOML syntax error at column 5: Invalid value"),
    ('modules = [\n  "a",\n  = 1,\n]\n', "s.toml:8: TOML syntax error at column 3: Invalid value"),
])
def test_syntax_error_names_where_the_construct_starts(body, expected, registry):
    assert first_problem(HEAD + body, registry).startswith(expected)


def test_strings_comments_and_quotes_do_not_confuse_the_scan(registry):
    text = HEAD + 'modules = ["]", \'[\', # ] [\n  """a"""""]\n' + 'r = [8\n'
    assert first_problem(text, registry).startswith("s.toml:8: TOML syntax error at column 5: "
                                                    "unclosed array")


@given(st.text(alphabet='[]{}"\'#=\n ab,\\', max_size=60), st.integers(0, 80))
def test_scan_is_total_and_positions_are_in_the_text(text, end):
    for kind, start, stop in scan(text):
        assert 0 <= start < len(text) and (stop is None or start < stop <= len(text))
    opened = open_at(text, end)
    if opened is not None:
        assert 1 <= opened.line <= text.count("\n") + 1 and opened.column >= 1
