"""``[[freeze]]`` end to end on a tiny Llama folder: plan, merge onto the original or
the dequantized weights (streamed and in memory agree), HF PEFT export of a QLoRA
spec (training: test_freeze_train.py)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import peftspec
from peftspec.cli import cli
from peftspec.core.packed import dequantized

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchao")

from hf_tiny import llama  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


QLORA = textwrap.dedent("""
    [[freeze]]
    method = "nf4"
    modules = ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"]
    block_size = 16
    scaler_block_size = 2
    [[reparameterize]]
    method = "lora"
    modules = ["**.q_proj", "**.v_proj"]
    r = 4
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    base_dir = tmp / "base"
    llama().save_pretrained(base_dir, max_shard_size="20KB")
    (tmp / "qlora.toml").write_text(QLORA)
    model = llama()
    peftspec.apply(peftspec.parse_spec(QLORA), model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
    adapter = tmp / "a.safetensors"
    peftspec.save_adapter(model, adapter)
    return tmp, base_dir, adapter, model


def read(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_plan_shows_frozen_base_bytes(setup):
    tmp, base_dir, _, _ = setup
    r = invoke("plan", tmp / "qlora.toml", "--model", f"hf:{base_dir}")
    assert r.exit_code == 0, r.output
    assert "frozen base:" in r.output and "14 module(s) frozen" in r.output
    r = invoke("plan", tmp / "qlora.toml", "--model", f"hf:{base_dir}", "--json")
    d = json.loads(r.output)["base_bytes"]
    assert d["after"] < d["before"] and d["frozen_modules"] == 14
    r = invoke("plan", tmp / "qlora.toml", "--model", f"hf:{base_dir}", "--memory", "--json")
    mem = json.loads(r.output)["memory"]["columns"]
    assert mem["spec"]["weights"] < mem["full"]["weights"] * 0.7  # counted as stored


@pytest.mark.parametrize("onto", ["original", "dequantized"])
def test_merge_onto(setup, onto):
    tmp, base_dir, adapter, model = setup
    streamed, in_memory = tmp / f"s-{onto}", tmp / f"m-{onto}"
    r = invoke("merge", "--model", f"hf:{base_dir}", "--adapter", adapter, "--out", streamed,
               "--onto", onto)
    assert r.exit_code == 0, r.output
    assert f"merged onto the {onto} weights" in r.output
    s = read(streamed)
    base = read(base_dir)
    assert set(s) == set(base) and all(s[k].dtype == base[k].dtype for k in s)
    # in memory (a py: source would go this way) writes the same tensors
    from peftspec.merging.stream import _merge_in_memory

    in_memory.mkdir()
    reg = peftspec.build_registry()
    _merge_in_memory(f"hf:{base_dir}", adapter, in_memory, False, reg, onto=onto)
    m = read(in_memory)
    for k in base:
        assert torch.allclose(s[k], m[k], atol=1e-6), k
    q = model.model.layers[0].self_attn.q_proj
    want = dequantized(q.weight) if onto == "dequantized" else base[
        "model.layers.0.self_attn.q_proj.weight"]
    delta = (q.lora_B @ q.lora_A) * q.scale
    assert torch.allclose(s["model.layers.0.self_attn.q_proj.weight"], want + delta, atol=1e-5)
    untouched = "model.layers.0.mlp.up_proj.weight"  # frozen, not adapted
    if onto == "original":
        assert torch.equal(s[untouched], base[untouched])
    else:
        assert torch.equal(s[untouched], dequantized(model.model.layers[0].mlp.up_proj.weight))


def test_export_hf_peft_of_a_qlora_spec_is_a_plain_lora(setup):
    peft = pytest.importorskip("peft")
    tmp, base_dir, adapter, model = setup
    out = tmp / "hf"
    r = invoke("export", adapter, "--model", f"hf:{base_dir}", "--format", "hf-peft", "--out",
               out)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    hf = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                        out).eval()
    ids = torch.randint(0, 100, (1, 6))
    fresh = llama()
    peftspec.load_adapter(fresh, adapter, freeze=False)  # the same adapter, 32-bit base
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, fresh(ids).logits, atol=1e-5)
