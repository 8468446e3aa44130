"""The README's quick start is what CI runs, word for word."""

from __future__ import annotations

import importlib.util

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash|sh)\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_and_ci_runs_them():
    commands = quick_start_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"README command not in .ci/run: {command}"


def test_example_specs_all_check(registry):
    import peftspec

    model = peftspec.load_model(registry=registry)
    classifier = peftspec.load_model(registry=registry, num_labels=2)  # has the score head
    for path in sorted((ROOT / "specs").glob("*.toml")):
        if path.name == "bad.toml":
            continue
        spec = peftspec.load_spec(path, registry=registry)
        target = classifier if path.name == "train-classify.toml" else model
        if path.name.startswith("smollm2"):  # Llama names: a tiny Llama stands in
            target = _tiny_llama()
        if "nf4" in path.read_text() and importlib.util.find_spec("torchao") is None:
            # without the quant extra, an nf4 rule is a clear compile error
            with pytest.raises(peftspec.SpecError, match=r"peftspec\[quant\]"):
                peftspec.compile_plan(spec, target, registry=registry)
            continue
        plan = peftspec.compile_plan(spec, target, registry=registry)
        assert plan.trainable_params > 0, path.name


def _tiny_llama():
    """SmolLM2's shape in small: GQA 9/3 heads, so k/v project to a third of the
    width, wide enough (288 -> 96) for the spec's r = 16 (compile refuses a
    rank above min(in, out))."""
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=288, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3))
