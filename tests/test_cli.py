"""End-to-end tests of the command line: one real run per command, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import peftspec
from peftspec.cli import cli

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"


def peftspec_exe() -> list[str]:
    exe = shutil.which("peftspec", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-c", "from peftspec.cli import main; main()"]


def run(*args, cwd=None):
    return subprocess.run(peftspec_exe() + [str(a) for a in args], capture_output=True,
                          text=True, cwd=cwd)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write(tmp_path, text, name="s.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# --- one real process per command ---------------------------------------------------

def test_help_teaches():
    r = run("--help")
    assert r.returncode == 0
    for word in ("check", "plan", "apply", "plugins", "Exit codes"):
        assert word in r.stdout
    r = run("plan", "--help")
    assert "hf:PATH" in r.stdout and "py:pkg.module:factory" in r.stdout


def test_check_ok_and_bad():
    r = run("check", SPECS / "lora.toml")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout
    r = run("check", SPECS / "bad.toml")
    assert r.returncode == 2
    assert f"{SPECS / 'bad.toml'}:5: reparameterize[0].method: unknown method 'lorra' " \
           "(did you mean 'lora'?)" in r.stderr
    assert "Traceback" not in r.stderr


def test_plan_human_and_json():
    r = run("plan", SPECS / "dora-bitfit.toml")
    assert r.returncode == 0, r.stderr
    assert "trainable:" in r.stdout and "adapter size" in r.stdout
    r = run("plan", SPECS / "lora.toml", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    model = peftspec.load_model()
    total = sum(p.numel() for p in model.parameters())
    (rule,) = data["rules"]
    assert rule["matched"] == 16 and rule["line"] == 7
    assert data["params_added"] == 16 * 8 * (128 + 128)
    assert data["total_params"] == total + data["params_added"]
    assert data["adapter_bytes"] == 4 * data["params_added"]
    assert data["trainable_percent"] == pytest.approx(100 * data["params_added"] /
                                                      data["total_params"])


def test_apply_writes_a_loadable_adapter(tmp_path):
    out = tmp_path / "lora.safetensors"
    r = run("apply", SPECS / "lora.toml", "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "wrote" in r.stdout
    model = peftspec.load_model()
    peftspec.load_adapter(model, out)
    assert len(peftspec.adapter_params(model)) == 32


def test_plugins_lists_methods_with_distribution():
    r = run("plugins", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    methods = {m["name"]: m for m in data["methods"]}
    assert methods["lora"]["distribution"] == "peftspec"
    assert methods["lora"]["family"] == "reparameterize"
    assert methods["select"]["family"] == "train"
    assert {s["source"] for s in data["sources"]} >= {"default", "py", "hf"}
    r = run("plugins")
    assert r.returncode == 0 and "lora" in r.stdout


# --- bad inputs: exit 2, a message naming file:line or the selector ---------------

def test_missing_spec_file(tmp_path):
    r = invoke("plan", tmp_path / "nope.toml")
    assert r.exit_code == 2
    assert "nope.toml: no such file" in r.stderr


def test_toml_syntax_error(tmp_path):
    p = write(tmp_path, '[[reparameterize]]\nmethod = "lora"\nmodules = ["a"\n')
    r = invoke("check", p)
    assert r.exit_code == 2
    assert f"{p}:3: TOML syntax error at column 11: unclosed array (no matching ']'); the " \
        "parser stopped at the end of the file: Unclosed array" in " ".join(r.stderr.split())


def test_selector_matching_nothing_names_it(tmp_path):
    p = write(tmp_path, '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.qproj"]\n')
    r = invoke("plan", p)
    assert r.exit_code == 2
    assert f"{p}:3: reparameterize[0].modules: selector '**.qproj' matched no module " \
           "(did you mean '**.q_proj'?)" in r.stderr


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_a_rule_excluding_all_it_selects_exits_2_at_its_exclude_line(tmp_path, command):
    # (as `type:Linear` with `exclude = ["lm_head"]` on GPT-2, whose projections are Conv1D)
    p = write(tmp_path, '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n'
                        'exclude = ["blocks.*.attn.*"]\n')
    out = tmp_path / "a.safetensors"
    r = invoke(command, p, *(["--out", out] if command == "apply" else []))
    assert r.exit_code == 2
    assert f"{p}:4: reparameterize[0].exclude: every module this rule's selectors match " \
           "(4: 'blocks.0.attn.q_proj'," in " ".join(r.stderr.split())
    assert "is removed by its own 'exclude'" in " ".join(r.stderr.split())
    assert not out.exists()
    p.write_text(p.read_text() + "optional = true\n")
    r = invoke(command, p, *(["--out", out] if command == "apply" else []))
    assert r.exit_code == 0, r.stderr


def test_method_on_unsupported_module(tmp_path):
    p = write(tmp_path, '[[reparameterize]]\nmethod = "lora"\nmodules = ["type:LayerNorm"]\n')
    r = invoke("apply", p, "--out", tmp_path / "a.safetensors")
    assert r.exit_code == 2
    assert "cannot apply to 'blocks.0.ln1' (LayerNorm)" in r.stderr
    assert not (tmp_path / "a.safetensors").exists()


def test_conflict_cites_both_lines(tmp_path):
    p = write(tmp_path, """\
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj"]

        [[reparameterize]]
        method = "lora"
        modules = ["blocks.0.**"]
        optional = true
        exclude = ["**.ln*", "**.mlp", "**.attn", "blocks.0", "**.k_proj", "**.v_proj", "**.o_proj", "**.up_proj", "**.down_proj"]
        """)
    r = invoke("plan", p)
    assert r.exit_code == 2
    assert f"{p}:5: reparameterize[1]: module 'blocks.0.attn.q_proj' is already " \
           "reparameterized by reparameterize[0] (line 1)" in r.stderr


@pytest.mark.parametrize("model, says", [
    ("nosuch:x", "unknown model source 'nosuch:x'"),
    ("py:no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("py:json", "expected 'py:package.module:factory'"),
    ("py:os:getcwd", "returned str, not a torch.nn.Module"),
    ("py:json:dumps", "'py:json:dumps' raised TypeError"),
    ("hf:/no/such/dir", "not a local transformers directory"),
])
def test_bad_model_sources(model, says):
    r = invoke("plan", SPECS / "lora.toml", "--model", model)
    assert r.exit_code == 2, r.output
    assert says in r.stderr


def test_py_model_source(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        from torch import nn
        def build():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    p = write(tmp_path, '[[reparameterize]]\nmethod = "lora"\nmodules = ["type:Linear"]\nr = 2\n')
    r = invoke("plan", p, "--model", "py:mymodels:build", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["params_added"] == 2 * (4 + 8) + 2 * (8 + 2)


def test_usage_error_is_exit_2():
    r = invoke("apply", SPECS / "lora.toml")  # --out missing
    assert r.exit_code == 2
    assert "--out" in r.output


def test_apply_is_deterministic_for_a_seed(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert invoke("apply", SPECS / "lora.toml", "--out", a, "--seed", "3").exit_code == 0
    assert invoke("apply", SPECS / "lora.toml", "--out", b, "--seed", "3").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    torch.manual_seed(0)


def test_unexpected_failure_is_exit_1_without_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = invoke("apply", SPECS / "lora.toml", "--out", blocker / "sub" / "a.safetensors")
    assert r.exit_code == 1
    assert "error:" in r.stderr and "Traceback" not in r.stderr
