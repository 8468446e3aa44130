"""llama.cpp LoRA adapter GGUF export, checked with references that share no code with it.

The file is read back with the ``gguf`` package's ``GGUFReader``; tensor names
are mapped back with gguf-py's own Llama name map; q/k rows are un-permuted
with transformers' GGUF loader (``LlamaTensorProcessor``, the inverse of
llama.cpp's converter). The deltas rebuilt from the file as llama.cpp computes
them (``alpha/r · lora_b · lora_a``; ``token_embd`` looked up in ``lora_a``) are
added to a fresh copy of the base, whose logits must equal peftspec's adapted
model's. Refusals go through the command line: exit code 2, the rule named,
nothing written.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor  # noqa: E402

import peftspec  # noqa: E402
from peftspec.cli import cli  # noqa: E402
from peftspec.core.errors import ConversionError  # noqa: E402
from peftspec.formats.gguf_export import (export_gguf, gguf_tensor_name, permute_rows,  # noqa: E402
                                  unpermute_rows)

from test_hf_format import randomize  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama(tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=120, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def rule(modules, family="reparameterize", **opts) -> str:
    body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in opts.items())
    key = "params" if family == "train" else "modules"
    return f"[[{family}]]\n{body}{key} = {json.dumps(modules)}\n\n"


def make_adapter(base, text: str, path: Path):
    model = peftspec.apply(peftspec.parse_spec(text), base)
    randomize(peftspec.trainable_parameters(model).items())
    peftspec.save_adapter(model, path)
    return model.eval()


def read_gguf(path: Path):
    """(metadata, {name: float32 tensor in torch's shape}) through the reference reader."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    for t in reader.tensors:  # ggml's ne is innermost first: the reverse of torch's shape
        assert tuple(int(d) for d in reversed(t.shape)) == tuple(tensors[t.name].shape)
    return meta, tensors


def hf_deltas(path: Path, config) -> dict[str, torch.Tensor]:
    """The weight updates llama.cpp applies, as HF weight name -> delta in HF layout."""
    meta, tensors = read_gguf(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    to_hf = {}
    for hf in [f"model.layers.{i}.{p}.weight" for i in range(config.num_hidden_layers)
               for p in [f"self_attn.{x}" for x in PROJ[:4]] + [f"mlp.{x}" for x in PROJ[4:]]] \
            + ["model.embed_tokens.weight", "lm_head.weight"]:
        to_hf[names.get_name(hf, try_suffixes=(".weight",))] = hf
    unpermute = LlamaTensorProcessor(
        config={"num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads})
    alpha = meta["adapter.lora.alpha"]
    out = {}
    for name in sorted(n.removesuffix(".lora_a") for n in tensors if n.endswith(".lora_a")):
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        scale = alpha / b.shape[1]  # llama.cpp: rank from lora_b
        if name.startswith("token_embd."):
            delta = (a @ b.t()) * scale  # row t = B · lora_a[t]
        else:
            delta = (b @ a) * scale
            delta = torch.from_numpy(unpermute.process(delta.numpy(), name).weights.copy())
        out[to_hf[name]] = delta
    return out


def reference(base, deltas) -> torch.nn.Module:
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta)
    return model


def logits(model):
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


ALL = rule([f"**.{p}" for p in PROJ], method="lora", r=4, alpha=8)
CASES = {
    "all-projections": ALL,
    # three scales to fold into one alpha: alpha 8/r 4, alpha 6/r 2, rsLoRA 5/sqrt(3)
    "per-rule-alpha-and-rslora": (rule(["**.q_proj", "**.k_proj"], method="lora", r=4, alpha=8)
                                  + rule(["**.v_proj", "**.o_proj"], method="lora", r=2, alpha=6)
                                  + rule(["**.mlp.*_proj"], method="lora", r=3, alpha=5, rslora=True)),
    "embedding-and-output": rule(["model.embed_tokens", "lm_head", "**.q_proj"],
                                 method="lora", r=3, alpha=6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deltas_from_the_file_reproduce_peftspec_logits(case, tmp_path):
    base = llama()
    ours = make_adapter(llama(), CASES[case], tmp_path / "a.safetensors")
    out = export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf", model=llama())
    deltas = hf_deltas(out, base.config)
    theirs = reference(base, deltas)
    expected = logits(ours)
    assert not torch.allclose(logits(base), expected, atol=1e-3), "the adapter must matter"
    torch.testing.assert_close(logits(theirs), expected, atol=2e-5, rtol=0)
    n_targets = sum(1 for n, _ in ours.named_modules() if hasattr(_, "lora_A"))
    assert len(deltas) == n_targets


def test_metadata_and_layout(tmp_path):
    make_adapter(llama(), CASES["per-rule-alpha-and-rslora"], tmp_path / "a.safetensors")
    out = export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf", model=llama())
    meta, tensors = read_gguf(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    assert meta["adapter.lora.alpha"] == 8.0  # the first rule's; the others folded into B
    assert tensors["blk.1.attn_q.weight.lora_a"].shape == (4, 64)     # A: r x in
    assert tensors["blk.1.attn_k.weight.lora_b"].shape == (32, 4)     # B: out x r (2 kv heads)
    assert tensors["blk.0.ffn_down.weight.lora_b"].shape == (64, 3)
    assert len(tensors) == 2 * 7 * 2
    # the v/o rule (alpha 6, r 2: scale 3) was folded: B' = B * 3 * 2 / 8
    from safetensors.torch import load_file

    raw = load_file(tmp_path / "a.safetensors")
    torch.testing.assert_close(tensors["blk.0.attn_v.weight.lora_b"],
                               raw["model.layers.0.self_attn.v_proj.lora_B"] * 0.75)
    # plain rule, same alpha: B is written as is (q permuted, v not)
    assert torch.equal(tensors["blk.0.attn_q.weight.lora_b"],
                       permute_rows(raw["model.layers.0.self_attn.q_proj.lora_B"], 4))


def test_f16_outtype(tmp_path):
    ours = make_adapter(llama(), ALL, tmp_path / "a.safetensors")
    out = export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf", model=llama(),
                      outtype="f16")
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    theirs = reference(llama(), hf_deltas(out, llama().config))
    torch.testing.assert_close(logits(theirs), logits(ours), atol=5e-3, rtol=0)


@given(heads=st.integers(1, 6), half=st.integers(1, 5), cols=st.integers(1, 4))
def test_permutation_interleaves_rotary_halves_and_inverts(heads, half, cols):
    d = 2 * half
    w = torch.arange(heads * d * cols, dtype=torch.float32).reshape(heads * d, cols)
    p = permute_rows(w, heads)
    for h in range(heads):
        for i in range(half):  # HF: halves [0, d/2) and [d/2, d); llama.cpp: pairs (2i, 2i+1)
            assert torch.equal(p[h * d + 2 * i], w[h * d + i])
            assert torch.equal(p[h * d + 2 * i + 1], w[h * d + half + i])
    assert torch.equal(unpermute_rows(p, heads), w)
    proc = LlamaTensorProcessor(
        config={"num_attention_heads": heads, "num_key_value_heads": heads})
    assert torch.equal(torch.from_numpy(proc._reverse_permute_weights(p.numpy(), heads)), w)


def test_tensor_names_match_gguf_py():
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4)
    for module in [f"model.layers.3.self_attn.{p}" for p in PROJ[:4]] + \
            [f"model.layers.0.mlp.{p}" for p in PROJ[4:]] + ["model.embed_tokens", "lm_head"]:
        assert gguf_tensor_name(module) == names.get_name(module) + ".weight"
    assert gguf_tensor_name("model.layers.0.input_layernorm") is None


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    out = {}
    for tied in (False, True):
        path = tmp_path_factory.mktemp("tied" if tied else "llama")
        llama(tied).save_pretrained(path)
        out[tied] = path
    return out


def test_cli_export_gguf_end_to_end(llama_dirs, tmp_path):
    ours = make_adapter(llama(), ALL, tmp_path / "a.safetensors")
    r = invoke("export", tmp_path / "a.safetensors", "--format", "gguf", "--out",
               tmp_path / "x.gguf", "--model", f"hf:{llama_dirs[False]}")
    assert r.exit_code == 0, r.output
    assert "x.gguf" in r.output and "--lora" in r.output
    theirs = reference(llama(), hf_deltas(tmp_path / "x.gguf", llama().config))
    torch.testing.assert_close(logits(theirs), logits(ours), atol=2e-5, rtol=0)
    r = invoke("export", tmp_path / "a.safetensors", "--format", "gguf", "--out",
               tmp_path / "y.gguf")
    assert r.exit_code == 2 and "--model" in r.output and not (tmp_path / "y.gguf").exists()
    r = invoke("export", "--help")
    assert r.exit_code == 0 and "gguf" in r.output and "ADAPTER" in r.output


REFUSED = {
    "dora": (rule(["**.q_proj"], method="lora", r=2) +
             rule(["**.v_proj"], method="lora", r=2, dora=True),
             r"reparameterize\[1\] \(line \d+\) is DoRA"),
    "bottleneck": (ALL + '[[augment]]\nmethod = "bottleneck"\nafter = ["**.mlp"]\nsize = 4\n',
                   r"augment\[0\] \(line \d+\) uses method 'bottleneck'"),
    "soft-prompt": ('[prefix]\nmethod = "prompt-tuning"\ntokens = 4\ninit = "vocab"\n',
                    r"prefix \(line \d+\) is a soft prompt"),
    "bitfit": (ALL + rule(["**.*norm.weight"], family="train"),
               r"train\[0\] \(line \d+\) trains the base's own parameters"),
    "whole-module": (ALL + rule(["lm_head.**"], family="train"),
                     r"train\[0\] .*peftspec merge"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_cli_refuses_what_llama_cpp_cannot_express(case, llama_dirs, tmp_path):
    text, message = REFUSED[case]
    make_adapter(llama(), text, tmp_path / "a.safetensors")
    r = invoke("export", tmp_path / "a.safetensors", "--format", "gguf", "--out",
               tmp_path / "a.gguf", "--model", f"hf:{llama_dirs[False]}")
    assert r.exit_code == 2, r.output
    assert re.search(message, " ".join(r.output.split())), r.output
    assert not (tmp_path / "a.gguf").exists()


def test_refuses_tied_embedding_and_output(llama_dirs, tmp_path):
    make_adapter(llama(True), rule(["model.embed_tokens", "**.q_proj"], method="lora"),
                 tmp_path / "a.safetensors")
    with pytest.raises(ConversionError, match=r"'model.embed_tokens' of a model whose input "
                                              r"embedding and output are tied"):
        export_gguf(tmp_path / "a.safetensors", tmp_path / "a.gguf", model=llama(True))
    assert not (tmp_path / "a.gguf").exists()


def test_refuses_other_architectures_and_modules(tmp_path):
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    make_adapter(copy.deepcopy(gpt2), rule(["**.c_attn"], method="lora"),
                 tmp_path / "g.safetensors")
    with pytest.raises(ConversionError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        export_gguf(tmp_path / "g.safetensors", tmp_path / "g.gguf", model=gpt2)
    # a Linear that llama.cpp's Llama has no tensor for
    def extra():
        model = llama()
        model.model.extra = torch.nn.Linear(8, 8)
        return model

    make_adapter(extra(), rule(["**.q_proj", "model.extra"], method="lora"),
                 tmp_path / "e.safetensors")
    with pytest.raises(ConversionError, match=r"reparameterize\[0\] \(line \d+\) adapts "
                                              r"'model.extra', which has no llama.cpp tensor"):
        export_gguf(tmp_path / "e.safetensors", tmp_path / "e.gguf", model=extra())
