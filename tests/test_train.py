"""peftspec train: the loop, its data, checkpoints and resume, through the API and CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import peftspec
from peftspec.cli import cli
from peftspec.models.nanogpt import GPT, GPTConfig
from peftspec.data import examples as data
from peftspec.core.train_config import TrainConfig
from peftspec.train.loop import train
from peftspec.models.tokenizer import ByteTokenizer

LORA = """
[spec]
name = "t"
[[reparameterize]]
method = "lora"
modules = ["**.q_proj", "**.v_proj"]
r = 4
alpha = 8
dropout = 0.1
"""

FAST = dict(batch_size=2, max_length=32)


def tiny():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [{"text": f"line {i}: the tide came in and went out again, {i * 7} times."}
             for i in range(12)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def spec():
    return peftspec.parse_spec(LORA, file="t.toml")


def records(path, kind="train"):
    return [json.loads(x) for x in path.read_text().splitlines() if json.loads(x)["type"] == kind]


def test_frozen_base_bit_identical_and_adapter_reloads(tmp_path, corpus):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig.resolve(data=str(corpus), steps=3, lr=1e-2, weight_decay=0.1, **FAST)
    result = train(spec(), cfg, model=model, out=tmp_path / "a.safetensors")
    assert result.step == 3 and all(map(lambda x: x == x, result.losses))
    adapter = set(peftspec.adapter_params(model))
    after = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name  # frozen: bitwise unchanged
    trained = {k: v for k, v in after.items() if k in adapter}
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in trained.items()
               if k.endswith("lora_B"))
    fresh = tiny()
    peftspec.load_adapter(fresh, tmp_path / "a.safetensors")
    state = fresh.state_dict()
    for name, tensor in before.items():
        assert torch.equal(state[name], tensor), name
    for name in adapter:
        assert torch.equal(state[name], after[name]), name


def test_resume_gives_the_same_losses(tmp_path, corpus):
    common = dict(data=str(corpus), steps=8, grad_accum=2, warmup=2, lr=5e-3, save_every=3,
                  **FAST)
    cfg_a = TrainConfig.resolve(**common, log=str(tmp_path / "a.jsonl"),
                                checkpoint_dir=str(tmp_path / "ca"))
    train(spec(), cfg_a, model=tiny(), out=tmp_path / "a.safetensors")
    cfg_b = TrainConfig.resolve(**common, log=str(tmp_path / "b.jsonl"),
                                checkpoint_dir=str(tmp_path / "cb"))
    # "killed" after step 5: the last periodic checkpoint is step 3, the log runs to 5
    first = train(spec(), cfg_b, model=tiny(), max_steps_this_run=5)
    assert first.interrupted and first.step == 5
    assert len(records(tmp_path / "b.jsonl")) == 5
    resumed = train(spec(), cfg_b, model=tiny(), out=tmp_path / "b.safetensors",
                    resume=tmp_path / "cb" / "step-00000003")
    assert resumed.step == 8 and len(resumed.losses) == 5
    a, b = records(tmp_path / "a.jsonl"), records(tmp_path / "b.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    from safetensors.torch import load_file

    ta, tb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_refuses_other_settings(tmp_path, corpus):
    cfg = TrainConfig.resolve(data=str(corpus), steps=2, save_every=2,
                              checkpoint_dir=str(tmp_path / "c"), **FAST)
    train(spec(), cfg, model=tiny())
    with pytest.raises(peftspec.PeftspecError, match="lr"):
        train(spec(), cfg.with_(lr=0.5), model=tiny(), resume=tmp_path / "c")


def test_prompt_completion_scores_the_completion_only():
    tok = ByteTokenizer()
    ex = data.Example(prompt="Q: hi\nA:", completion=" yo")
    ids, labels = data.encode(ex, tok, 64)
    assert ids == list(b"Q: hi\nA: yo") + [256]
    assert labels == [-100] * len(b"Q: hi\nA:") + list(b" yo") + [256]
    batch = data.collate([(ids, labels), ([1, 2, 3], [1, 2, 3])], pad_id=tok.pad_id)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (len(ids) - 3)
    assert (batch["labels"][1, 3:] == -100).all()
    # a completion cut off entirely by max_length leaves nothing to learn: dropped
    kept, dropped = data.encode_all([ex], tok, 5)
    assert kept == [] and dropped == 1


def test_prompt_completion_trains(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"})
                              for i in range(6)))
    held = tmp_path / "eval.jsonl"
    held.write_text(json.dumps({"prompt": "7 + 1 =", "completion": " 8"}) + "\n")
    cfg = TrainConfig.resolve(data=str(path), eval=str(held), eval_every=1, steps=2,
                              log=str(tmp_path / "m.jsonl"), **FAST)
    result = train(spec(), cfg, model=tiny())
    assert result.step == 2 and result.eval_loss is not None
    evals = records(tmp_path / "m.jsonl", "eval")
    assert [r["step"] for r in evals] == [1, 2]
    assert evals[0]["tokens"] == len(b" 8") + 1  # the completion and end-of-text only


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "not valid JSON"),
    ('["text"]', "expected a JSON object"),
    ('{"txt": "x"}', "expected a 'text' key"),
    ('{"prompt": "x"}', "missing key 'completion'"),
    ('{"text": 3}', "'text' must be a string"),
    ('{"text": "a", "label": 1}', "classification"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    result = CliRunner().invoke(cli, ["train", "specs/lora.toml", "--data", str(path),
                                      "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2, result.output
    assert f"{path}:3:" in result.output and message in result.output


def test_cli_trains_default_model_on_shipped_text(tmp_path):
    log, out = tmp_path / "m.jsonl", tmp_path / "a.safetensors"
    result = CliRunner().invoke(cli, ["train", "specs/train-lora.toml", "--steps", "3",
                                      "--batch-size", "2", "--max-length", "32", "--out",
                                      str(out), "--log", str(log), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["step"] == 3 and summary["eval_loss"] is not None
    assert summary["peak_rss_mb"] > 0 and summary["tokens_per_s"] > 0
    assert [r["step"] for r in records(log)] == [1, 2, 3]
    assert records(log, "eval")[-1]["step"] == 3
    peftspec.load_adapter(peftspec.load_model(), out)


def test_train_config_precedence(tmp_path, corpus):
    spec_path = tmp_path / "s.toml"
    spec_path.write_text(LORA + f"""
[train_config]
data = "{corpus.name}"
steps = 2
lr = 0.004
batch_size = 2
max_length = 16
""")
    log = tmp_path / "m.jsonl"
    result = CliRunner().invoke(cli, ["train", str(spec_path), "--steps", "3", "--log", str(log),
                                      "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0, result.output
    recs = records(log)
    assert len(recs) == 3                    # the command line wins
    assert recs[0]["lr"] == pytest.approx(0.004)  # the spec over the default
    assert recs[0]["tokens"] <= 2 * 16          # batch_size, max_length from the spec


def test_train_config_errors_have_lines(tmp_path):
    text = LORA + "\n[train_config]\nsteps = 2\nbatch_sise = 4\nprecision = \"fp16\"\nlr = -1\n"
    with pytest.raises(peftspec.SpecError) as info:
        peftspec.parse_spec(text, file="s.toml")
    lines = text.splitlines()
    msgs = [str(p) for p in info.value.problems]
    assert len(msgs) == 3
    assert f"s.toml:{lines.index('batch_sise = 4') + 1}: train_config.batch_sise" in msgs[0]
    assert "did you mean 'batch_size'" in msgs[0]
    assert "fp32, bf16" in msgs[1] and "at least 0" in msgs[2]


def test_gradient_checkpointing_matches_and_trains_through_frozen_embedding(corpus):
    batch = data.collate(data.encode_all(data.read_examples(corpus), ByteTokenizer(), 32)[0][:2],
                         256)
    grads = []
    for checkpointed in (False, True):
        model = tiny()
        torch.manual_seed(0)
        peftspec.apply(peftspec.parse_spec(LORA.replace("0.1", "0.0")), model)
        if checkpointed:
            from peftspec.train import grad_checkpoint as checkpointing
            checkpointing.enable(model)
        loss = model(**batch).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in peftspec.trainable_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
        assert grads[1][name].abs().sum() > 0 or name.endswith("lora_A"), name


def test_checkpointing_run_with_eval_split(corpus):
    cfg = TrainConfig.resolve(data=str(corpus), steps=2, gradient_checkpointing=True,
                              eval_split=0.2, **FAST)
    result = train(spec(), cfg, model=tiny())
    assert result.step == 2 and result.eval_loss is not None


def test_bf16_autocast_trains_lora(corpus):
    cfg = TrainConfig.resolve(data=str(corpus), steps=2, precision="bf16", **FAST)
    model = tiny()
    result = train(spec(), cfg, model=model)
    assert result.step == 2 and all(x == x for x in result.losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


def test_peak_memory_is_this_process_own():
    """ru_maxrss carries a parent's peak over fork+exec; the reported peak must not."""
    import subprocess
    import sys

    code = ("import sys; from peftspec.train.loop import peak_rss_mb; print(peak_rss_mb())")
    parent = ("import subprocess, sys; x = bytearray(600 * 2**20); x[::4096] = b'1' * len(x[::4096]); "
              "del x; print(subprocess.run([sys.executable, '-c', sys.argv[1]], "
              "capture_output=True, text=True, check=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent, code], capture_output=True, text=True,
                         check=True).stdout
    assert 0 < float(out) < 500, out  # the child never held the parent's 600 MiB
