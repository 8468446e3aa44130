"""peftspec train under signals and on hf: models; peftspec memory; peftspec report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import peftspec
from peftspec.cli import cli
from peftspec.models.nanogpt import GPT, GPTConfig
from peftspec.train import memory as mem


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    log, ckdir = tmp_path / "m.jsonl", tmp_path / "ck"
    cmd = [sys.executable, "-c", "from peftspec.cli import main; main()", "train",
           "specs/train-lora.toml", "--steps", "100000", "--batch-size", "1",
           "--max-length", "16", "--log", str(log), "--checkpoint-dir", str(ckdir),
           "--out", str(tmp_path / "a.safetensors")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.is_file() and len(log.read_text().splitlines()) >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    assert "interrupted" in stdout and "--resume" in stdout
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    latest = ckdir / (ckdir / "latest").read_text().strip()
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == steps[-1] >= 2
    assert {p.name for p in latest.iterdir()} == {"adapter.safetensors",
                                                  "optimizer.safetensors", "state.json"}
    assert not (tmp_path / "a.safetensors").exists()
    peftspec.load_adapter(peftspec.load_model(), latest / "adapter.safetensors")


def _independent(model, trainable):
    """Bytes of real gradients and AdamW states after one step."""
    params = [p for p in trainable]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, 256, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    states = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights, grads, states


def test_memory_table_exact_figures():
    result = CliRunner().invoke(cli, ["memory", "specs/dora-bitfit.toml", "--batch-size", "3",
                                      "--seq-len", "40", "--precision", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    full, spec = table["columns"]["full"], table["columns"]["spec"]

    base = GPT(GPTConfig())
    assert (full["weights"], full["gradients"], full["optimizer"]) == \
        _independent(base, list(base.parameters()))
    patched = GPT(GPTConfig())
    peftspec.apply(peftspec.load_spec("specs/dora-bitfit.toml"), patched)
    trainable = list(peftspec.trainable_parameters(patched).values())
    assert (spec["weights"], spec["gradients"], spec["optimizer"]) == \
        _independent(patched, trainable)
    assert spec["trainable"] == sum(p.numel() for p in trainable) < full["trainable"]
    # the documented estimate, written out: L=4, h=128, a=4, V=257, b=3, s=40, p=2
    L, h, a, V, b, s, p = 4, 128, 4, 257, 3, 40, 2
    expected = L * p / 2 * s * b * h * (34 + 5 * a * s / h) + s * b * h * p + s * b * V * (p + 8)
    assert full["activations"] == spec["activations"] == int(expected)
    assert spec["total"] == spec["weights"] + spec["gradients"] + spec["optimizer"] + \
        spec["activations"]


def test_memory_table_prints():
    result = CliRunner().invoke(cli, ["memory", "specs/lora.toml", "--gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    for word in ("weights", "gradients", "optimizer states", "activations", "total",
                 "859,008", "32,768"):
        assert word in result.output


def test_plan_memory_is_the_memory_table():
    """`plan --memory` prints the plan and then `memory`'s table; --json nests both."""
    args = ["specs/dora-bitfit.toml", "--batch-size", "3", "--seq-len", "40"]
    alone = CliRunner().invoke(cli, ["memory", *args, "--json"])
    both = CliRunner().invoke(cli, ["plan", *args, "--memory", "--json"])
    plain = CliRunner().invoke(cli, ["plan", "specs/dora-bitfit.toml", "--json"])
    assert alone.exit_code == both.exit_code == plain.exit_code == 0, both.output
    nested = json.loads(both.stdout)
    assert nested["memory"] == json.loads(alone.stdout)
    assert nested["plan"] == json.loads(plain.stdout)
    text = CliRunner().invoke(cli, ["plan", *args, "--memory"])
    assert text.exit_code == 0 and "trainable:" in text.output
    assert "optimizer states (AdamW)" in text.output
    refused = CliRunner().invoke(cli, ["plan", *args])
    assert refused.exit_code == 2 and "add --memory" in refused.output


def test_soft_prompt_tokens_count_in_the_activation_estimate():
    result = CliRunner().invoke(cli, ["memory", "specs/prompt-tuning.toml", "--batch-size", "2",
                                      "--seq-len", "30", "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    tokens = peftspec.load_spec("specs/prompt-tuning.toml").rules[0].options.tokens
    assert table["spec_extra_tokens"] == tokens > 0
    dims, precision = mem.Dims(**table["dims"]), table["precision"]  # auto: bf16 on AMX
    assert table["columns"]["full"]["activations"] == mem.activation_bytes(dims, 2, 30, precision)
    assert table["columns"]["spec"]["activations"] == \
        mem.activation_bytes(dims, 2, 30 + tokens, precision)


def test_checkpointing_shrinks_the_activation_estimate():
    dims = mem.Dims(layers=12, hidden=768, heads=12, vocab=50257)
    full = mem.activation_bytes(dims, 8, 512, "fp32")
    assert mem.activation_bytes(dims, 8, 512, "fp32", checkpointing=True) < full / 2
    assert mem.activation_bytes(dims, 8, 512, "bf16") < full


def _metrics(path):
    recs = [{"type": "train", "step": i, "loss": 5 - i / 10, "lr": 1e-3 * i / 10}
            for i in range(1, 11)]
    recs.insert(5, {"type": "eval", "step": 5, "loss": 4.7, "tokens": 10})
    path.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"type": "tra')  # torn line


def test_report_renders_png(tmp_path):
    pytest.importorskip("matplotlib")
    _metrics(tmp_path / "m.jsonl")
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "m.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "10 train and 1 eval points" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_report_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    _metrics(tmp_path / "m.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "m.jsonl"), "--out",
                                      str(tmp_path / "c.png")])
    assert result.exit_code == 1
    assert "pip install 'peftspec[plot]'" in result.output


@pytest.mark.slow
def test_train_hf_model_with_its_own_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = ["the tide rose over the quay", "the clock kept the time of the sea",
              "a small boat rode the painted shore"] * 4
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                pad_token="[PAD]", eos_token="[EOS]")
    config = transformers.GPT2Config(vocab_size=len(fast), n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2, eos_token_id=fast.eos_token_id,
                                     bos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    fast.save_pretrained(tmp_path / "gpt2")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in corpus))
    spec = tmp_path / "s.toml"
    spec.write_text('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.c_attn"]\nr = 2\n')
    log = tmp_path / "m.jsonl"
    result = CliRunner().invoke(cli, [
        "train", str(spec), "--model", f"hf:{tmp_path / 'gpt2'}", "--data", str(data),
        "--steps", "3", "--batch-size", "2", "--gradient-checkpointing", "--lr", "0.01",
        "--log", str(log), "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0, result.output
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["tokens"] < 2 * 10  # words, not bytes: the directory's tokenizer


def test_a_log_path_that_is_a_folder_is_refused_before_the_model_loads(tmp_path,
                                                                      monkeypatch):
    import peftspec.train.tasks as tasks

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --log was checked")

    monkeypatch.setattr(tasks, "load_model", no_load)
    result = CliRunner().invoke(cli, ["train", "specs/train-lora.toml", "--steps", "1",
                                      "--log", str(tmp_path), "--out",
                                      str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2, result.output
    assert f"--log {tmp_path}: is a folder" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "a.safetensors").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_log_write_that_fails_mid_run_is_one_line(tmp_path):
    # /dev/full opens, and every write to it fails with ENOSPC: a full disk
    result = CliRunner().invoke(cli, ["train", "specs/train-lora.toml", "--steps", "2",
                                      "--batch-size", "1", "--max-length", "16",
                                      "--log", "/dev/full", "--out",
                                      str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert lines == ["error: --log /dev/full: cannot write step 1 to the metrics log (No "
                     "space left on device); give a file path in a writable folder, or "
                     "leave --log out"], result.output
    assert not (tmp_path / "a.safetensors").exists()
