"""peftspec compare: end to end on the built-in model, resumption, the report,
and bad input. One comparison (two specs and full fine-tuning, 3 steps) is
shared by the module; the tests that change runs work on a copy of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from peftspec.cli import cli
from peftspec.compare.figures import FIGURES
from peftspec.compare.runner import cached_record
from peftspec.compare.table import COST, QUALITY, cost_cells, quality_cells, tables
from peftspec.compare.settings import FULL, Entry, Settings, run_key

SPECS = ["specs/lora.toml", "specs/prompt-tuning.toml"]
COMMON = ["--data", "data/brindlecombe-train.jsonl", "--eval", "data/brindlecombe-heldout.jsonl",
          "--steps", "3", "--batch-size", "4", "--max-length", "96", "--gen-tokens", "4",
          "--probe", "data/study-probe.jsonl", "--probe-tokens", "2"]


def _compare(*args: str):
    return CliRunner().invoke(cli, ["compare", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    result = _compare(*SPECS, "--full", *COMMON, "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result.output, json.loads((out / "results.json").read_text())


@pytest.fixture
def copy_of(compared, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(compared[0], out)
    return out


def _mtimes(out: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}


@pytest.mark.slow
def test_every_column_is_present_and_consistent_with_plan(compared):
    out, output, results = compared
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == ["lora-attention", "prompt-tuning", FULL]
    assert results["failed"] == [] and results["command"][:2] == ["peftspec", "compare"]
    assert results["environment"]["torch"] and results["settings"]["steps"] == 3
    for spec in SPECS:
        plan = json.loads(CliRunner().invoke(cli, [
            "plan", spec, "--memory", "--json", "--batch-size", "4", "--seq-len", "96",
            "--precision", results["settings"]["precision"]]).output)  # auto may pick bf16 here
        r = runs[plan["plan"]["spec"]["name"]]
        assert r["params"]["trainable"] == plan["plan"]["trainable_params"]
        assert r["params"]["base"] == plan["plan"]["base_params"]
        assert r["params"]["trainable_pct"] == pytest.approx(
            100 * plan["plan"]["trainable_params"] / plan["plan"]["base_params"])
        for col in ("full", "spec"):  # the estimate is plan --memory's, column for column
            assert r["memory"]["estimate"]["columns"][col] == plan["memory"]["columns"][col]
        assert r["storage"]["adapter_bytes"] == \
            (out / "runs" / r["name"] / "adapter.safetensors").stat().st_size
        assert r["storage"]["adapter_bytes"] < r["storage"]["full_copy_bytes"] / 10
        assert r["command"].startswith(f"peftspec train {spec} ")
    full = runs[FULL]
    assert full["params"]["trainable"] == full["params"]["base"]
    assert full["params"]["trainable_pct"] == 100.0
    assert full["storage"]["adapter_bytes"] >= full["storage"]["full_copy_bytes"]
    for r in runs.values():
        q = r["quality"]
        assert [p[0] for p in q["train_curve"]] == [1, 2, 3]
        assert [p[0] for p in q["eval_curve"]] == [1, 2, 3]
        assert q["eval_loss"] == q["eval_curve"][-1][1] and q["eval_accuracy"] is None
        assert r["speed"]["tokens_per_s"] > 0 and r["speed"]["tokens"] > 0
        assert r["memory"]["peak_rss_mb"] >= r["memory"]["loaded_rss_mb"] > 0
        f = r["forgetting"]
        assert f["increase"] == pytest.approx(f["after"] - f["before"])
        lat = r["latency"]
        assert lat["base_ms"] >= 0 and lat["unmerged_ms"] >= 0
        assert (lat["merged_ms"] is None) == (lat["not_mergeable"] is not None)
        assert (out / "runs" / Entry(r["name"], None).slug / "metrics.jsonl").is_file()
        answers = r["answers"]
        assert [a["prompt"] for a in answers] == \
            [json.loads(line)["prompt"] for line in open("data/study-probe.jsonl")]
        assert all(isinstance(a["base"], str) and isinstance(a["adapter"], str)
                   for a in answers)
    # the base is the same model in every run: its reference and eval losses too, and
    # the base's answers
    for key in ("forgetting", "quality"):
        field = "before" if key == "forgetting" else "eval_loss_before"
        assert len({round(r[key][field], 6) for r in runs.values()}) == 1
    assert len({json.dumps([a["base"] for a in r["answers"]]) for r in runs.values()}) == 1
    assert runs["prompt-tuning"]["latency"]["not_mergeable"]  # a soft prompt does not fold
    assert runs["lora-attention"]["latency"]["merged_ms"] is not None
    assert runs[FULL]["forgetting"]["before"] != runs[FULL]["forgetting"]["after"]
    for name in runs:
        assert f"done {name}: eval loss " in output
    console = Console(width=250, record=True)
    for t in tables(results):
        console.print(t)
    shown = console.export_text()
    for col in COST + QUALITY:
        assert col in shown
    lora = runs["lora-attention"]
    for cell in cost_cells(lora) + quality_cells(lora):
        assert cell in shown
    assert "n/a" in quality_cells(runs["prompt-tuning"])  # not mergeable
    for fig in FIGURES:
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_finished_runs_are_read_back_and_unfinished_ones_redone(compared, copy_of, tmp_path):
    out = copy_of
    before = _mtimes(out)
    # an interrupted run (no result.json) is redone from the start, the finished ones are
    # read back; a run that fails (its spec matches nothing) is named, the others go on
    (out / "runs" / "prompt-tuning" / "result.json").unlink()
    bad = tmp_path / "nomatch.toml"
    bad.write_text('[spec]\nname = "nomatch"\n\n[[reparameterize]]\nmethod = "lora"\n'
                   'modules = ["**.no_such_module"]\nr = 2\n')
    again = _compare(*SPECS, str(bad), "--full", *COMMON, "--out", str(out))
    assert again.exit_code == 1, again.output
    assert again.output.count("read back") == 2
    assert "failed nomatch" in again.output and "no_such_module" in again.output
    after = _mtimes(out)
    assert after["prompt-tuning"] != before["prompt-tuning"]
    assert {k: v for k, v in after.items() if k != "prompt-tuning"} == \
        {k: v for k, v in before.items() if k != "prompt-tuning"}
    results = json.loads((out / "results.json").read_text())
    assert [f["name"] for f in results["failed"]] == ["nomatch"]
    assert [r["name"] for r in results["runs"]] == [r["name"] for r in compared[2]["runs"]]
    redone = results["runs"][1]  # the same seed and settings: the same numbers
    assert redone["quality"]["train_curve"] == compared[2]["runs"][1]["quality"]["train_curve"]
    assert results["runs"][0] == compared[2]["runs"][0]


def test_a_record_made_with_other_settings_is_stale(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"key": "abc", "name": "x"}))
    assert cached_record(tmp_path, "abc") == {"key": "abc", "name": "x"}
    assert cached_record(tmp_path, "abd") is None
    (tmp_path / "result.json").write_text('{"key": "abc", "na')  # torn: never read back
    assert cached_record(tmp_path, "abc") is None


def test_report_redraws_from_the_json(copy_of):
    for fig in FIGURES:
        (copy_of / fig).unlink()
    result = _compare("--report", str(copy_of))
    assert result.exit_code == 0, result.output
    assert "lora-attention" in result.output and "read back" not in result.output
    for fig in FIGURES:
        assert (copy_of / fig).stat().st_size > 1000
    as_json = json.loads(_compare("--report", str(copy_of), "--json").output)
    assert as_json["runs"][0]["name"] == "lora-attention"
    md = _compare("--report", str(copy_of), "--markdown").output
    tables_md = [t for t in md.split("\n\n") if t.strip()]
    assert len(tables_md) == 3  # cost, quality, memory: a header, a rule, a row per run
    for t in tables_md:
        assert len(t.strip().splitlines()) == 2 + len(as_json["runs"])
    assert "| lora-attention | 32.8k | 3.81% |" in md
    assert _compare("specs/lora.toml", *COMMON, "--markdown", "--out", "x").exit_code == 2


@pytest.mark.parametrize("args, needle", [
    (["specs/bad.toml", *COMMON], "specs/bad.toml"),
    (["specs/nope.toml", *COMMON], "specs/nope.toml: no such spec file"),
    (["specs/lora.toml", "--eval-split", "0.2", "--data", "data/missing.jsonl"],
     "data/missing.jsonl: no such data file"),
    (["specs/lora.toml", "--data", "data/brindlecombe-train.jsonl"],
     "--eval FILE or --eval-split"),
    (["specs/lora.toml", *COMMON, "--reference", "data/sentiment.jsonl"],
     "must be text"),
    ([*COMMON], "nothing to compare"),
])
def test_bad_input_is_named_and_exits_2(tmp_path, args, needle):
    result = _compare(*args, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert needle in result.output.replace("\n", " ")
    assert not (tmp_path / "o" / "runs").exists()


def test_a_folder_another_comparison_holds_is_refused(tmp_path):
    import fcntl
    import os

    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out / ".compare.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242")
        result = _compare("specs/lora.toml", *COMMON, "--out", str(out))
        assert result.exit_code == 2, result.output
        text = result.output.replace("\n", " ")
        assert "another `peftspec compare` (pid 4242)" in text and "--out" in text
        assert not (out / "runs").exists()
    finally:
        os.close(fd)


def test_usage_errors(tmp_path):
    assert "--report DIR redraws" in _compare("--report", str(tmp_path), "specs/lora.toml").output
    missing = _compare("--report", str(tmp_path))
    assert missing.exit_code == 2 and "results.json: no such file" in missing.output
    (tmp_path / "results.json").write_text("[1, 2]")
    assert "no 'runs' list" in _compare("--report", str(tmp_path)).output
    assert _compare("specs/lora.toml", *COMMON).exit_code == 2  # no --out


_SETTINGS = Settings(model=None, data="data/brindlecombe-train.jsonl",
                     eval="data/brindlecombe-heldout.jsonl", reference="data/reference.txt")


@given(key=st.sampled_from(["steps", "batch_size", "lr", "warmup", "max_length", "seed",
                            "gen_tokens", "eval_every"]),
       value=st.integers(2, 50))
def test_every_setting_is_in_the_run_key(key, value):
    entry = Entry("x", "specs/lora.toml", Path("specs/lora.toml").read_text())
    changed = _SETTINGS.with_(**{key: value if key != "lr" else value * 1e-4})
    assert run_key(entry, _SETTINGS) == run_key(entry, _SETTINGS.with_())
    assert (run_key(entry, changed) == run_key(entry, _SETTINGS)) == (changed == _SETTINGS)
    assert run_key(Entry("x", "specs/lora.toml", entry.text + " "), _SETTINGS) != \
        run_key(entry, _SETTINGS)


def test_full_lr_keys_only_the_full_row():
    entry = Entry("x", "specs/lora.toml", Path("specs/lora.toml").read_text())
    full = Entry(FULL, None, "t")
    with_full_lr = _SETTINGS.with_(full_lr=1e-4)
    assert run_key(entry, with_full_lr) == run_key(entry, _SETTINGS)  # a spec row is shared
    assert run_key(full, with_full_lr) != run_key(full, _SETTINGS)
    assert run_key(full, _SETTINGS.with_(full_lr=_SETTINGS.lr)) == run_key(full, _SETTINGS)


def test_the_study_specs_check_and_its_tiny_model_loads(tmp_path, monkeypatch):
    """Every specs/study/ spec validates (``check`` needs no torchao, even for
    the nf4 row's; bench/study.py leaves that row out when torchao is missing),
    and the study's py: source gives the built-in model with the pretrained
    weights merged in."""
    import sys

    import torch

    import peftspec

    study = sorted(Path("specs/study").glob("*.toml"))
    assert len(study) == 14
    for path in study:
        result = CliRunner().invoke(cli, ["check", str(path)])
        assert result.exit_code == 0, (path, result.output)
    monkeypatch.syspath_prepend("bench")
    sys.modules.pop("study_models", None)
    import study_models

    monkeypatch.delenv("PEFTSPEC_STUDY_TINY", raising=False)
    with pytest.raises(peftspec.PeftspecError, match="run bench/study.py"):
        study_models.pretrained_tiny()
    model = peftspec.load_model()
    peftspec.apply(_full_spec(tmp_path), model)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(0.5)
    peftspec.save_adapter(model, tmp_path / "w.safetensors")
    monkeypatch.setenv("PEFTSPEC_STUDY_TINY", str(tmp_path / "w.safetensors"))
    tiny = study_models.pretrained_tiny()
    assert not peftspec.is_patched(tiny)
    merged = dict(peftspec.merge(model).named_parameters())
    for name, p in tiny.named_parameters():
        assert torch.equal(p, merged[name]), name


def _full_spec(tmp_path: Path) -> Path:
    from peftspec.compare.settings import FULL_SPEC

    path = tmp_path / "full.toml"
    path.write_text(FULL_SPEC)
    return path


@pytest.mark.slow
def test_classification_data_reports_accuracy(tmp_path):
    result = _compare("specs/train-classify.toml", "--data", "data/sentiment.jsonl",
                      "--eval-split", "0.25", "--steps", "2", "--batch-size", "4",
                      "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    (r,) = json.loads((tmp_path / "o" / "results.json").read_text())["runs"]
    assert r["task"] == "sequence-classification" and r["lr"] == 3e-3  # the spec's own lr
    assert 0.0 <= r["quality"]["eval_accuracy"] <= 1.0
    assert len(r["quality"]["eval_curve"][-1]) == 3  # step, loss, accuracy
    # a classifier generates no text and has no reference loss: those are absent, not 0
    assert r["latency"]["base_ms"] is None and r["forgetting"]["before"] is None
    assert r["quality"]["eval_loss_before"] is None and r["answers"] is None
    assert "%)" in quality_cells(r)[1]
