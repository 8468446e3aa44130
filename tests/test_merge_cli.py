"""`peftspec merge`: streamed for hf: directories, equal to merging in memory."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import peftspec
from peftspec.cli import cli

transformers = pytest.importorskip("transformers")

from hf_tiny import llama  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


SPEC = textwrap.dedent("""
    [[train]]
    params = ["**.input_layernorm.weight"]
    [[reparameterize]]
    method = "lora"
    modules = ["**.q_proj", "**.v_proj"]
    r = 4
    [[reparameterize]]
    method = "lora"
    modules = ["**.down_proj", "**.embed_tokens"]
    r = 2
    rslora = true
""")


@pytest.fixture
def setup(tmp_path):
    base = llama()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir, max_shard_size="20KB")  # several shards
    model = llama()
    peftspec.apply(peftspec.parse_spec(SPEC), model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    adapter = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, adapter)
    return base_dir, adapter, model


def test_streamed_merge_equals_unmerged(setup, tmp_path):
    base_dir, adapter, adapted = setup
    out = tmp_path / "merged"
    r = invoke("merge", "--model", f"hf:{base_dir}", "--adapter", adapter, "--out", out,
               "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["merged_modules"] == 2 * 3 + 1 and summary["shards"] > 1
    # sharded like the input, same keys, config copied
    assert sorted(p.name for p in base_dir.iterdir()) == sorted(p.name for p in out.iterdir())
    for shard in base_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as a, safe_open(str(out / shard.name), "pt") as b:
            assert list(a.keys()) == list(b.keys())
    merged = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)


def test_merge_refuses_unmergeable_and_keeps_existing_output(setup, tmp_path):
    base_dir, _, _ = setup
    model = llama()
    peftspec.apply(peftspec.parse_spec('[[augment]]\nmethod = "bottleneck"\n'
                                       'preset = "pfeiffer"\nsize = 4\n'), model)
    adapter = tmp_path / "b.safetensors"
    peftspec.save_adapter(model, adapter)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    r = invoke("merge", "--model", f"hf:{base_dir}", "--adapter", adapter, "--out", out)
    assert r.exit_code == 1 and "cannot merge: bottleneck" in r.stderr
    assert (out / "keep.txt").read_text() == "old"
    r = invoke("merge", "--model", f"hf:{base_dir}", "--adapter", adapter, "--out", out,
               "--skip-unmergeable")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists()


def test_merge_default_model_in_memory(tmp_path):
    model = peftspec.load_model()
    peftspec.apply(peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\n'
                                       'modules = ["**.q_proj"]\n'), model)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(0.01)
    adapter = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, adapter)
    r = invoke("merge", "--adapter", adapter, "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    plain = peftspec.load_model()
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    plain.load_state_dict(state, strict=False)
    ids = torch.randint(0, 257, (2, 8))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)


def test_merge_refuses_pickles(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    llama().config.save_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"not really")
    model = llama()
    peftspec.apply(peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\n'
                                       'modules = ["**.q_proj"]\n'), model)
    adapter = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, adapter)
    r = invoke("merge", "--model", f"hf:{d}", "--adapter", adapter, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "never unpickles" in r.stderr


@pytest.mark.parametrize("damage, says", [
    ("truncate-shard", "not a readable safetensors file"),
    ("truncate-adapter", "not a readable safetensors file"),
    ("nan-adapter", "NaN or Inf"),
])
def test_merge_refuses_broken_files_and_keeps_existing_output(setup, tmp_path, damage, says):
    base_dir, adapter, _ = setup
    if damage == "truncate-shard":
        shard = sorted(base_dir.glob("*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "truncate-adapter":
        adapter.write_bytes(adapter.read_bytes()[:-100])
    else:
        from safetensors.torch import load_file, save_file
        from peftspec.formats.adapter_file import read_metadata

        meta = read_metadata(adapter)
        tensors = {k: v * float("nan") for k, v in load_file(str(adapter)).items()}
        save_file(tensors, str(adapter), metadata=meta)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    r = invoke("merge", "--model", f"hf:{base_dir}", "--adapter", adapter, "--out", out)
    assert r.exit_code == 2, r.output
    assert says in r.stderr
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_streamed_merge_refuses_tied_weights(tmp_path):
    """GPT-2 ties lm_head to wte: merging LoRA on wte would change the head too."""
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    base_dir = tmp_path / "gpt2"
    base.save_pretrained(base_dir)
    model = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    peftspec.apply(peftspec.parse_spec(
        '[[reparameterize]]\nmethod = "lora"\nmodules = ["transformer.wte"]\nr = 2\n'), model)
    adapter = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, adapter)
    out = tmp_path / "merged"
    r = invoke("merge", "--model", f"hf:{base_dir}", "--adapter", adapter, "--out", out)
    assert r.exit_code != 0
    assert "tied to 'lm_head'" in r.output and "untie the weights" in r.output, r.output
    assert not out.exists()
