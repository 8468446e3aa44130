"""``peftspec generate`` and :mod:`peftspec.generate`, on the built-in model and on
the tiny GGUF Llama (fast; the real SmolLM2 is in test_smollm2.py).

Generation must give what each model gives alone: per-row batches (base and
several adapters in one batch) equal one pass per adapter, an adapter equals
transformers' ``generate`` on the merged model, soft prompts run in a pass
of their own, the chat template frames prompts, sampling is seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import peftspec
from peftspec.cli import cli
from peftspec.generate import GenerateError, Prompt, generate, load, read_prompts
from peftspec.models.tokenizer import ByteTokenizer
from shared_helpers import make_adapter

LORA = '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.v_proj"]\nr = 4\n'
DORA = LORA + "dora = true\n"
BOTTLENECK = '[[augment]]\nmethod = "bottleneck"\npreset = "houlsby"\nsize = 8\n'
PROMPT = '[prefix]\nmethod = "prompt-tuning"\ntokens = 8\n'
BITFIT = '[[train]]\nparams = ["**.ln_f.*"]\n'


def _alone(source, adapter, prompts, registry, **kw):
    """Each adapter on a fresh model, one at a time (the reference)."""
    session = load(source, [adapter] if adapter else [], registry=registry)
    return generate(session.model, session.tokenizer, prompts,
                    adapters=[session.names[0] if adapter else None], **kw)


PROMPTS = ["The harbour", "A ship came in"]


@pytest.fixture(scope="module")
def default_adapters(tmp_path_factory):
    reg = peftspec.build_registry()
    d = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(None, text, d / f"{name}.safetensors", i, reg)
            for i, (name, text) in enumerate([("lora", LORA), ("dora", DORA),
                                              ("bottleneck", BOTTLENECK),
                                              ("prompt", PROMPT), ("bitfit", BITFIT)])}


def test_per_row_batch_equals_each_adapter_alone(default_adapters, registry):
    names = ["lora", "dora", "bottleneck", "prompt", "bitfit"]
    session = load(None, [default_adapters[n] for n in names], registry=registry)
    assert session.names == names
    got = generate(session.model, session.tokenizer, PROMPTS, adapters=[None, *names],
                   max_new_tokens=12)
    assert [(a.prompt, a.adapter) for a in got] == \
        [(p, n) for p in PROMPTS for n in [None, *names]]
    for n in [None, *names]:
        want = _alone(None, default_adapters[n] if n else None, PROMPTS, registry,
                      max_new_tokens=12)
        assert [a.ids for a in got if a.adapter == n] == [a.ids for a in want], n
        assert [a.text for a in got if a.adapter == n] == [a.text for a in want], n
    tokens = {n: [a.ids for a in got if a.adapter == n] for n in [None, *names]}
    # every adapter changes the output, or the test would be empty (the random
    # default model ignores soft prompts; the tiny Llama test below has them)
    for n in ["lora", "dora", "bottleneck", "bitfit"]:
        assert tokens[n] != tokens[None], n


def test_default_model_uses_its_own_generate(default_adapters, registry):
    session = load(None, [default_adapters["lora"]], registry=registry)
    (a,) = generate(session.model, session.tokenizer, ["The harbour"], adapters=["lora"],
                    max_new_tokens=10)
    ids = torch.tensor([ByteTokenizer().encode("The harbour")])
    want = session.model.generate(ids, 10)[0, ids.shape[1]:].tolist()
    assert a.text == ByteTokenizer().decode(want).strip()
    assert a.new_tokens == 10 and not a.finished
    with pytest.raises(GenerateError, match="greedy"):
        generate(session.model, session.tokenizer, ["x"], temperature=0.7)


def test_cli_end_to_end_on_the_built_in_model(default_adapters, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "A ship came in", "completion": "at dawn"}) + "\n")
    r = CliRunner().invoke(cli, ["generate", "--adapter", str(default_adapters["lora"]),
                                 "--adapter", str(default_adapters["prompt"]),
                                 "-p", "The harbour", "--prompts", str(prompts),
                                 "--max-new-tokens", "6", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["adapters"] == {"lora": str(default_adapters["lora"]),
                               "prompt": str(default_adapters["prompt"])}
    assert [(a["prompt"], a["adapter"]) for a in out["answers"]] == [
        ("The harbour", None), ("The harbour", "lora"), ("The harbour", "prompt"),
        ("A ship came in", None), ("A ship came in", "lora"), ("A ship came in", "prompt")]
    assert out["answers"][3]["expected"] == "at dawn"
    assert all(a["new_tokens"] == 6 for a in out["answers"])
    reg = peftspec.build_registry()
    want = _alone(None, default_adapters["lora"], ["The harbour"], reg, max_new_tokens=6)
    assert out["answers"][1]["text"] == want[0].text
    human = CliRunner().invoke(cli, ["generate", "--adapter", str(default_adapters["lora"]),
                                     "--no-base", "-p", "The harbour",
                                     "--max-new-tokens", "4"])
    assert human.exit_code == 0, human.output
    assert "prompt" in human.output and "lora" in human.output
    assert "base" not in human.output


@pytest.mark.parametrize("args,message", [
    ([], "give --prompt TEXT"),
    (["-p", "x", "--no-base"], "--no-base leaves nothing"),
    (["-p", "x", "--adapter", "missing.safetensors"], "no such adapter file"),
    (["--prompts", "missing.jsonl"], "no such prompts file"),
    (["-p", "x", "--temperature", "0.5"], "greedy"),
    (["-p", "x", "--model", "nope:x"], "unknown model source"),
])
def test_cli_bad_input_exits_2(args, message):
    r = CliRunner().invoke(cli, ["generate", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_classifier_adapters_are_refused(tmp_path, registry):
    model = registry.load_model(None, num_labels=2)
    peftspec.apply(peftspec.parse_spec('[[train]]\nparams = ["score.**"]\n'), model,
                   registry=registry)
    path = tmp_path / "clf.safetensors"
    peftspec.save_adapter(model, path, metadata={"task": "sequence-classification",
                                                 "labels": '["a","b"]'})
    with pytest.raises(GenerateError, match="classifier"):
        load(None, [path], registry=registry)


def test_read_prompts(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    assert read_prompts(p) == [Prompt("a", "b"), Prompt("c")]
    t = tmp_path / "p.txt"
    t.write_text("first\n\n  second  \n")
    assert read_prompts(t) == [Prompt("first"), Prompt("second")]
    p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(peftspec.PeftspecError, match=r"p\.jsonl:2: expected an object"):
        read_prompts(p)
    p.write_text("{oops\n")
    with pytest.raises(peftspec.PeftspecError, match=r"p\.jsonl:1: not valid JSON"):
        read_prompts(p)
    p.write_text("\n")
    with pytest.raises(peftspec.PeftspecError, match="no prompts"):
        read_prompts(p)


# --- a transformers model: the tiny GGUF Llama ---------------------------------------

@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    pytest.importorskip("gguf")
    from gguf_tiny import write_tiny_llama

    from peftspec.models import gguf as gguf_source

    d = tmp_path_factory.mktemp("tiny")
    old = __import__("os").environ.get("PEFTSPEC_CACHE")
    __import__("os").environ["PEFTSPEC_CACHE"] = str(d / "cache")
    gguf_source._verified.clear()
    yield f"gguf:{write_tiny_llama(d / 'tiny.gguf')}"
    gguf_source._verified.clear()
    if old is None:
        del __import__("os").environ["PEFTSPEC_CACHE"]
    else:
        __import__("os").environ["PEFTSPEC_CACHE"] = old


def test_adapter_equals_transformers_generate_on_the_merged_model(tiny_source, tmp_path):
    reg = peftspec.build_registry()
    path = make_adapter(tiny_source, LORA, tmp_path / "t.safetensors", 3, reg)
    session = load(tiny_source, [path], registry=reg)
    got = generate(session.model, session.tokenizer, ["hello", "tell me about the world"],
                   adapters=[None, "t"], max_new_tokens=12)
    merged = reg.load_model(tiny_source)
    peftspec.load_adapter(merged, path, registry=reg)
    merged = peftspec.merge(merged)
    base = reg.load_model(tiny_source)
    tok = session.tokenizer
    for model, name in ((base, None), (merged, "t")):
        for prompt in ("hello", "tell me about the world"):
            ids = torch.tensor([tok.encode_chat(prompt)])
            out = model.generate(ids, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
            new = out[0, ids.shape[1]:].tolist()
            cut = new.index(tok.eos_id) if tok.eos_id in new else len(new)
            (a,) = [a for a in got if a.prompt == prompt and a.adapter == name]
            assert a.text == tok.decode_clean(new[:cut]).strip(), (prompt, name)
            assert a.new_tokens == cut


PREFIX = '[prefix]\nmethod = "prefix-tuning"\ntokens = 4\n'


def test_soft_prompts_beside_lora_on_a_transformers_model(tiny_source, tmp_path):
    reg = peftspec.build_registry()
    files = {name: make_adapter(tiny_source, text, tmp_path / f"{name}.safetensors", i, reg,
                            scale=2.0)
             for i, (name, text) in enumerate([("lora", LORA), ("prompt", PROMPT),
                                               ("prefix", PREFIX)])}
    session = load(tiny_source, list(files.values()), registry=reg)
    prompts = ["hello", "tell me about the world"]
    got = generate(session.model, session.tokenizer, prompts,
                   adapters=[None, "lora", "prompt", "prefix"], max_new_tokens=10)
    for n in [None, "lora", "prompt", "prefix"]:
        want = _alone(tiny_source, files[n] if n else None, prompts, reg, max_new_tokens=10)
        assert [a.ids for a in got if a.adapter == n] == [a.ids for a in want], n
        if n in ("lora", "prefix"):  # (random models shrug off a prompt: test_smollm2.py)
            assert [a.ids for a in got if a.adapter == n] != \
                [a.ids for a in got if a.adapter is None], n


def test_chat_template_frames_prompts_unless_raw(tiny_source, registry):
    session = load(tiny_source, [], registry=registry)
    tok = session.tokenizer
    assert tok.has_chat_template
    ids = tok.encode_chat("hi")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    from peftspec.generate import prompt_ids

    assert prompt_ids(tok, "hi", chat=False) == tok.encode("hi")
    chat = generate(session.model, tok, ["hi"], max_new_tokens=8)
    raw = generate(session.model, tok, ["hi"], max_new_tokens=8, chat=False)
    assert chat[0].ids != raw[0].ids


def test_sampling_is_seeded_and_streaming_reports_growing_answers(tiny_source, registry):
    session = load(tiny_source, [], registry=registry)
    kw = {"max_new_tokens": 10, "temperature": 1.5, "top_p": 0.95}
    a = generate(session.model, session.tokenizer, ["hello"], seed=1, **kw)
    b = generate(session.model, session.tokenizer, ["hello"], seed=1, **kw)
    c = generate(session.model, session.tokenizer, ["hello"], seed=2, **kw)
    assert a == b and a != c
    seen = []
    final = generate(session.model, session.tokenizer, ["hello", "world"], max_new_tokens=6,
                     on_update=lambda answers: seen.append([x.new_tokens for x in answers]))
    assert len(seen) >= 6
    assert seen[0] == [1, 1] and seen[-1] == [x.new_tokens for x in final]
    assert all(x <= y for s, t in zip(seen, seen[1:]) for x, y in zip(s, t))


def test_training_formats_prompts_with_the_chat_template(tiny_source, registry):
    from peftspec.data.examples import IGNORE, Example, encode

    session = load(tiny_source, [], registry=registry)
    tok = session.tokenizer
    ids, labels = encode(Example(prompt="hi", completion="yo"), tok, 128)
    p = tok.encode_chat("hi")
    assert ids == p + tok.encode("yo") + [tok.eos_id]
    assert labels == [IGNORE] * len(p) + tok.encode("yo") + [tok.eos_id]
    text_ids, _ = encode(Example(text="hi"), tok, 128)
    assert text_ids == tok.encode("hi") + [tok.eos_id]  # plain text stays plain
