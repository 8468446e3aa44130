"""Trainable tokens against HF PEFT (``TrainableTokensConfig``): counts, outputs with a
tied head (GPT-2) and without (Llama), the format both ways, merge, beside LoRA."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import peftspec
from peftspec.core.errors import ConversionError, SpecError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import gpt2, llama  # noqa: E402

TOKENS = [3, 7, 50]


ARCHS = {"gpt2": (gpt2, "transformer.wte"), "llama": (llama, "model.embed_tokens")}


def ids():
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    x[:, :3] = torch.tensor(TOKENS)  # the trained rows must be looked up
    return x


def spec(emb, extra=""):
    return peftspec.parse_spec('[[reparameterize]]\nmethod = "trainable-tokens"\n'
                               f'modules = ["{emb}"]\ntoken_indices = {TOKENS}\n' + extra)


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_counts_outputs_and_format_match_hf_peft(arch, tmp_path):
    make, emb = ARCHS[arch]
    base = make()
    hf = peft.get_peft_model(copy.deepcopy(base), peft.TrainableTokensConfig(
        token_indices=TOKENS)).eval()
    ours = copy.deepcopy(base)
    peftspec.apply(spec(emb), ours)
    assert torch.equal(logits(ours), logits(base))  # the rows start as they were
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert sum(p.numel() for p in peftspec.trainable_parameters(ours).values()) == n_hf == 96
    with torch.no_grad():
        (delta,) = [p for p in hf.parameters() if p.requires_grad]
        delta.copy_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(2)))
        peftspec.adapter_params(ours)[f"{emb}.trainable_tokens_delta"].copy_(delta)
    expected = logits(hf)
    assert not torch.allclose(expected, logits(base), atol=1e-2)
    torch.testing.assert_close(logits(ours), expected, atol=1e-5, rtol=0)

    peftspec.save_adapter(ours, tmp_path / "a.safetensors")
    stored = load_file(tmp_path / "a.safetensors")
    assert {k: tuple(v.shape) for k, v in stored.items()} == \
        {f"{emb}.trainable_tokens_delta": (3, 32)}  # those rows only
    folder = peftspec.export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf",
                                     model=copy.deepcopy(base))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == TOKENS
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)

    hf.save_pretrained(tmp_path / "hf-saved")  # GPT-2: with the tied head's copy
    back, spec_path = peftspec.import_hf_peft(tmp_path / "hf-saved", tmp_path / "b.safetensors",
                                              model=copy.deepcopy(base))
    loaded = peftspec.load_adapter(copy.deepcopy(base), back)
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)
    assert "trainable-tokens" in spec_path.read_text()


def test_merge_equals_unmerged_on_an_untied_embedding():
    base = llama()
    model = copy.deepcopy(base)
    peftspec.apply(spec("model.embed_tokens"), model)
    with torch.no_grad():
        for p in peftspec.adapter_params(model).values():
            p.add_(1.0)
    out = logits(model)
    merged = peftspec.merge(model)
    torch.testing.assert_close(logits(merged), out, atol=1e-6, rtol=0)
    changed = (merged.model.embed_tokens.weight != base.model.embed_tokens.weight).any(dim=1)
    assert changed.nonzero().view(-1).tolist() == TOKENS


def test_beside_lora_trains_both_and_reloads_exactly(tmp_path):
    base = llama()
    model = copy.deepcopy(base)
    lora = '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\nr = 2\n'
    peftspec.apply(spec("model.embed_tokens", lora), model)
    params = peftspec.trainable_parameters(model)
    assert set(params) >= {"model.embed_tokens.trainable_tokens_delta",
                           "model.layers.0.self_attn.q_proj.lora_B"}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for _ in range(2):
        model(input_ids=ids(), labels=ids()).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, before[n]) for n, p in params.items())
    peftspec.save_adapter(model, tmp_path / "a.safetensors")
    fresh = peftspec.load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh), logits(model))
    peftspec.remove(fresh)
    assert torch.equal(logits(fresh), logits(base))


LORA_TARGETS = {"gpt2": ("c_attn", "**.c_attn"), "llama": ("q_proj", "**.q_proj")}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_beside_lora_is_one_hf_peft_lora_adapter_both_ways(arch, tmp_path):
    """HF PEFT's ``LoraConfig(trainable_token_indices=...)`` <-> a LoRA rule and a
    trainable-tokens rule: counts, tensor names and logits equal, GPT-2's tied head too."""
    make, emb = ARCHS[arch]
    hf_target, selector = LORA_TARGETS[arch]
    base = make()
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=[hf_target], trainable_token_indices=TOKENS,
        init_lora_weights=False)).eval()
    with torch.no_grad():
        delta = hf.get_parameter(
            f"base_model.model.{emb}.token_adapter.trainable_tokens_delta.default")
        delta.add_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(3)))
    expected = logits(hf)
    hf.save_pretrained(tmp_path / "hf-saved")
    saved = load_file(tmp_path / "hf-saved" / "adapter_model.safetensors")

    back, spec_path = peftspec.import_hf_peft(tmp_path / "hf-saved", tmp_path / "b.safetensors",
                                              model=copy.deepcopy(base))
    text = spec_path.read_text()
    assert 'method = "lora"' in text and 'method = "trainable-tokens"' in text
    loaded = peftspec.load_adapter(copy.deepcopy(base), back)
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert sum(p.numel() for p in peftspec.adapter_params(loaded).values()) == n_hf
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)

    folder = peftspec.export_hf_peft(back, tmp_path / "hf-again", model=copy.deepcopy(base))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["trainable_token_indices"] == TOKENS
    exported = load_file(folder / "adapter_model.safetensors")
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in saved.items()}
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)


def test_beside_lora_exports_by_name_without_a_model_and_reads_hf_peft_dict_form(tmp_path):
    base = llama()
    model = copy.deepcopy(base)
    lora = '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.v_proj"]\nr = 2\n'
    peftspec.apply(spec("model.embed_tokens", lora), model)
    with torch.no_grad():
        for p in peftspec.adapter_params(model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    expected = logits(model)
    peftspec.save_adapter(model, tmp_path / "a.safetensors")
    folder = peftspec.export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf")  # no model
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": TOKENS}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)
    config["trainable_token_indices"] = {"embed_tokens": TOKENS}  # HF's suffix rule
    (folder / "adapter_config.json").write_text(json.dumps(config))
    back, _ = peftspec.import_hf_peft(folder, tmp_path / "b.safetensors", model=base)
    torch.testing.assert_close(logits(peftspec.load_adapter(copy.deepcopy(base), back)),
                               expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value, words", [
    ([], "empty"), ({"no_such_table": [1]}, "names no module"),
    ({"embed_tokens": ["a"]}, "expected int list or int list dict")])
def test_bad_trainable_token_indices_in_an_hf_lora_config_are_refused(value, words, tmp_path):
    base = llama()
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["q_proj"], trainable_token_indices=TOKENS))
    hf.save_pretrained(tmp_path / "hf")
    cfg = tmp_path / "hf" / "adapter_config.json"
    config = json.loads(cfg.read_text())
    config["trainable_token_indices"] = value
    cfg.write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=words):
        peftspec.import_hf_peft(tmp_path / "hf", tmp_path / "b.safetensors", model=base)
    assert not (tmp_path / "b.safetensors").exists()


def test_beside_a_method_whose_config_cannot_carry_them_is_refused(tmp_path):
    base = llama()
    model = copy.deepcopy(base)
    ia3 = '[[augment]]\nmethod = "ia3"\nmodules = ["**.k_proj"]\n'
    peftspec.apply(spec("model.embed_tokens", ia3), model)
    peftspec.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ConversionError, match="only beside LORA.*exports as IA3"):
        peftspec.export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf", model=base)


@pytest.mark.parametrize("indices, words", [
    ("[]", "token_indices is empty"), ("[1, 1]", "lists a token twice"),
    ("[3, 100]", "token index 100 is outside this embedding's 100 rows")])
def test_bad_token_indices_are_refused(indices, words):
    text = ('[[reparameterize]]\nmethod = "trainable-tokens"\nmodules = ["model.embed_tokens"]\n'
            f'token_indices = {indices}\n')
    with pytest.raises(SpecError, match=words):
        peftspec.compile_plan(peftspec.parse_spec(text, file="t.toml"), llama())
