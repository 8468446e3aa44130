"""LoRA's ``init = "eva"`` (plugins/lora/eva.py) against HF PEFT's EVA on the same
model and batches; its HF PEFT export; ``peftspec train`` starting from it."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from click.testing import CliRunner

import peftspec
from peftspec.cli import cli
from peftspec.core.errors import PeftspecError, SpecError
from peftspec.models.nanogpt import GPT, GPTConfig
from peftspec.core.train_config import TrainConfig
from peftspec.train.loop import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import gpt2, llama  # noqa: E402
from test_train import corpus  # noqa: E402,F401 - the fixture, shared


def batches(n=6, b=4, t=16):
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (b, t), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding: left out of the SVD
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def spec(selectors, rho, r=4, alpha=8):
    return peftspec.parse_spec(
        f'[[reparameterize]]\nmethod = "lora"\nmodules = {json.dumps(selectors)}\n'
        f'r = {r}\nalpha = {alpha}\ninit = "eva"\neva_rho = {rho}\n', file="eva.toml")


# arch: (model, HF target_modules, rho) - Llama's q/k/v share their input (one SVD)
CASES = {"llama-rho2": (llama, ["q_proj", "k_proj", "v_proj", "o_proj"], 2.0),
         "gpt2-rho2": (gpt2, ["c_attn", "c_fc"], 2.0),
         "llama-rho1": (llama, ["q_proj", "v_proj"], 1.0)}


@pytest.fixture(scope="module", params=list(CASES))
def both(request):
    """HF PEFT's and peftspec's EVA on copies of one base, the same batches."""
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    make, targets, rho = CASES[request.param]
    base = make()
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
        eva_config=EvaConfig(rho=rho))).eval()
    initialize_lora_eva_weights(hf, dataloader=batches(), show_progress_bar=False)
    ours = copy.deepcopy(base)
    peftspec.apply(spec([f"**.{t}" for t in targets], rho), ours)
    lines = []
    peftspec.init_from_data(ours, batches(), lines.append)
    return request.param, base, hf, ours, lines


def hf_a(hf):
    return {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"):
            p.detach() for n, p in hf.named_parameters() if "lora_A" in n}


@pytest.mark.slow  # the module's HF PEFT and peftspec EVA runs: ~10 s in all
def test_ranks_and_subspaces_equal_hf_peft(both):
    case, base, hf, ours, lines = both
    theirs = hf_a(hf)
    mine = {n.removesuffix(".lora_A"): p.detach()
            for n, p in peftspec.adapter_params(ours).items() if n.endswith(".lora_A")}
    assert {k: v.shape[0] for k, v in mine.items()} == \
        {k: v.shape[0] for k, v in theirs.items()}
    if case.endswith("rho2") and case.startswith("llama"):
        assert len({v.shape[0] for v in mine.values()}) > 1, "rho = 2 moved no rank"
    for name, a in theirs.items():
        b = mine[name]
        sign = torch.sign((a * b).sum(dim=1, keepdim=True))  # each row up to its sign
        torch.testing.assert_close(b * sign, a, atol=1e-5, rtol=0)
        torch.testing.assert_close(b @ b.t(), torch.eye(b.shape[0]), atol=1e-4, rtol=0)
    for n, p in peftspec.adapter_params(ours).items():
        if n.endswith(".lora_B"):
            assert not p.any(), n  # B = 0: the outputs are the base's
    ids = batches()[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, base(input_ids=ids).logits)
    assert lines and lines[-1].startswith("EVA: converged")
    # the base is untouched: every frozen tensor equals the original's, bit for bit
    frozen = dict(base.named_parameters())
    adapters = set(peftspec.adapter_params(ours))
    for name, p in ours.named_parameters():
        if name not in adapters:
            assert torch.equal(p, frozen[name]), name


@pytest.mark.slow
def test_export_is_a_plain_hf_lora_with_its_rank_pattern(both, tmp_path):
    case, base, hf, ours, _ = both
    ours = peftspec.load_adapter(copy.deepcopy(base), _saved(ours, tmp_path))  # a copy
    with torch.no_grad():  # a trained-looking B, so the logits test the ranks and scales
        for n, p in peftspec.adapter_params(ours).items():
            if n.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(6)))
    ids = batches()[0]["input_ids"]
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
    peftspec.save_adapter(ours, tmp_path / "eva.safetensors")
    reloaded = peftspec.load_adapter(copy.deepcopy(base), tmp_path / "eva.safetensors")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    folder = peftspec.export_hf_peft(tmp_path / "eva.safetensors", tmp_path / "hf",
                                     model=copy.deepcopy(base))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["init_lora_weights"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    want = {k: v.shape[0] for k, v in hf_a(hf).items()}
    assert {k: v.shape[0] for k, v in hf_a(loaded).items()} == want
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    if len(set(want.values())) > 1:
        assert config["rank_pattern"], config

    # and HF PEFT's own EVA adapter reads back (init_lora_weights = "eva", its ranks)
    with torch.no_grad():  # (B only: the ranks test reads HF's A)
        for n, p in hf.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    hf.save_pretrained(tmp_path / "hf-eva")
    back, spec_path = peftspec.import_hf_peft(tmp_path / "hf-eva", tmp_path / "b.safetensors",
                                              model=copy.deepcopy(base))
    assert 'init = "eva"' in spec_path.read_text()
    mine = peftspec.load_adapter(copy.deepcopy(base), back)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        assert not torch.allclose(theirs, base(input_ids=ids).logits, atol=1e-3)
        torch.testing.assert_close(mine(input_ids=ids).logits, theirs, atol=1e-5, rtol=0)


def _saved(model, tmp_path):
    peftspec.save_adapter(model, tmp_path / "fixture.safetensors")
    return tmp_path / "fixture.safetensors"


def tiny():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


EVA_SPEC = """
[spec]
name = "eva"
[[reparameterize]]
method = "lora"
modules = ["**.q_proj", "**.k_proj", "**.v_proj", "**.o_proj"]
r = 4
alpha = 8
init = "eva"

[[train]]
params = ["ln_f.bias"]
"""


def test_train_starts_from_eva_and_keeps_the_base(tmp_path, corpus, capsys):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig.resolve(data=str(corpus), steps=1, lr=0.0, weight_decay=0.0,
                              batch_size=4, max_length=32)
    train(peftspec.parse_spec(EVA_SPEC, file="eva.toml"), cfg, model=model,
          out=tmp_path / "a.safetensors")
    assert "EVA: converged" in capsys.readouterr().err
    text = model._peftspec.plan.spec.text  # EVA's ranks (if they moved), the rest kept
    assert text.startswith("# EVA redistributed") and '[[train]]\nparams = ["ln_f.bias"]' in text
    adapters = peftspec.adapter_params(model)
    a = {n: p.detach() for n, p in adapters.items() if n.endswith(".lora_A")}
    assert a and all(torch.allclose(x @ x.t(), torch.eye(x.shape[0]), atol=1e-4)
                     for x in a.values()), "A is not EVA's orthonormal rows"
    after = model.state_dict()
    for name, tensor in before.items():
        if name != "ln_f.bias":
            assert torch.equal(after[name], tensor), name  # frozen: bitwise unchanged
    fresh = peftspec.load_adapter(tiny(), tmp_path / "a.safetensors")
    for name, p in peftspec.adapter_params(fresh).items():
        assert torch.equal(p, adapters[name]), name


@pytest.mark.slow
def test_cli_train_reports_eva_on_stderr(tmp_path, corpus):
    spec_path = tmp_path / "eva.toml"
    spec_path.write_text(EVA_SPEC)
    out = tmp_path / "a.safetensors"
    result = CliRunner().invoke(cli, ["train", str(spec_path), "--data", str(corpus),
                                      "--steps", "2", "--batch-size", "4", "--max-length",
                                      "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "EVA: converged" in result.stderr
    peftspec.load_adapter(peftspec.load_model(), out)


@pytest.mark.parametrize("body, words", [
    ('modules = ["**.q_proj"]\neva_rho = 3.0', "eva_rho is an EVA option"),
    ('modules = ["**.q_proj"]\ninit = "eva"\neva_rho = 0.5', "eva_rho"),
    ('modules = ["model.embed_tokens"]\ninit = "eva"', "init 'eva' works on Linear"),
    ('modules = ["**.q_proj"]\ninit = "eva"\ndora = true', "init 'eva' works on Linear")])
def test_bad_eva_options_are_refused(body, words):
    text = f'[[reparameterize]]\nmethod = "lora"\n{body}\n'
    with pytest.raises(SpecError, match=words):
        peftspec.compile_plan(peftspec.parse_spec(text, file="e.toml"), llama())


def test_too_few_positions_and_no_batches_are_clear_errors():
    model = llama()
    peftspec.apply(spec(["**.q_proj"], 2.0), model)
    short = [{"input_ids": torch.tensor([[1, 2, 3]])}]
    with pytest.raises(PeftspecError, match="no batch has the 8 kept positions"):
        peftspec.init_from_data(model, short)
    with pytest.raises(PeftspecError, match="no batches"):
        peftspec.init_from_data(model, [])
