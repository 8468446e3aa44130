"""PiSSA and OLoRA inits (plugins/lora/init.py) against HF PEFT, and the promise
they change: the base weights become the residual W − s·B₀A₀, which then stays
bit-identical, while the original comes back whenever the adapter is off."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from click.testing import CliRunner

import peftspec
from peftspec.cli import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import gpt2, llama  # noqa: E402


# (id, model, targets, fan_in_fan_out, our init + niter, HF's init_lora_weights)
CASES = [("gpt2-pissa", gpt2, ["c_attn", "c_fc"], True, ("pissa", 0), "pissa"),
         ("llama-pissa", llama, ["q_proj", "down_proj"], False, ("pissa", 0), "pissa"),
         ("llama-pissa-niter", llama, ["q_proj", "down_proj"], False, ("pissa", 4),
          "pissa_niter_4"),
         ("llama-olora", llama, ["q_proj", "down_proj"], False, ("olora", 0), "olora")]


def ids(n=2):
    return torch.randint(0, 100, (n, 11), generator=torch.Generator().manual_seed(1))


def logits(model, n=2):
    with torch.no_grad():
        return model(input_ids=ids(n)).logits


def spec(targets, init, niter=0, r=4, alpha=8):
    return peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\n'
                               f"modules = {json.dumps(['**.' + t for t in targets])}\n"
                               f'r = {r}\nalpha = {alpha}\ninit = "{init}"\nniter = {niter}\n')


def apply_both(make, targets, fifo, ours_init, hf_init):
    base = make()
    torch.manual_seed(5)  # svd_lowrank draws: the same in both
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fifo,
        init_lora_weights=hf_init)).eval()
    ours = copy.deepcopy(base)
    torch.manual_seed(5)
    peftspec.apply(spec(targets, *ours_init), ours)
    return base, hf, ours.eval()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_factors_residual_and_outputs_match_hf_peft(case, tmp_path):
    _, make, targets, fifo, ours_init, hf_init = case
    base, hf, ours = apply_both(make, targets, fifo, ours_init, hf_init)
    if ours_init[1]:  # svd_lowrank: HF draws its Linear inits first, so other random
        # vectors; both find the same principal subspace of these small weights
        torch.testing.assert_close(logits(ours), logits(hf), atol=1e-4, rtol=0)
        base_w = dict(base.named_parameters())
        for name, m in ours.named_modules():
            if hasattr(m, "lora_A"):  # residual + s·B₀A₀ is the original weight
                torch.testing.assert_close(m.merged_weight(), base_w[f"{name}.weight"],
                                           atol=1e-5, rtol=0, msg=name)
        return
    hf_state = {k.removeprefix("base_model.model."): v for k, v in hf.state_dict().items()}
    compared = 0
    for name, p in ours.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        hf_name = f"{owner}.base_layer.{leaf}" if leaf in ("weight", "bias") and any(
            owner.endswith(t) for t in targets) else name
        hf_name = hf_name.replace("lora_A", "lora_A.default.weight").replace(
            "lora_B", "lora_B.default.weight")
        if hf_name in hf_state:
            torch.testing.assert_close(p, hf_state[hf_name], atol=1e-5, rtol=0, msg=name)
            compared += 1
    assert compared == len(hf_state)
    # unchanged at apply up to the residual's rounding, as HF PEFT's
    torch.testing.assert_close(logits(ours), logits(base), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(ours), logits(hf), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:], ids=["gpt2-pissa", "llama-pissa",
                                                             "llama-olora"])
def test_the_promise_holds_for_the_residual_and_the_original_comes_back(case, tmp_path):
    _, make, targets, fifo, ours_init, _ = case
    base = make()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = copy.deepcopy(base)
    plan = peftspec.compile_plan(spec(targets, *ours_init), model)
    assert "residual" in plan.notes["reparameterize[0]"]
    peftspec.apply(spec(targets, *ours_init), model)
    params = dict(model.named_parameters())
    rewritten = [n for n in original if not torch.equal(params[n], original[n])]
    assert rewritten and all(any(n.endswith(f"{t}.weight") for t in targets)
                             for n in rewritten)
    residual = {n: params[n].detach().clone() for n in rewritten}

    opt = torch.optim.AdamW(peftspec.trainable_parameters(model).values(), lr=1e-2)
    for _ in range(3):
        model(input_ids=ids(), labels=ids()).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(params[n], residual[n]) for n in rewritten)  # frozen residual
    trained = logits(model)
    with peftspec.disabled(model):  # the plain base: the original weights, exactly
        assert all(torch.equal(params[n], original[n]) for n in original)
        assert torch.equal(logits(model), logits(base))
    assert all(torch.equal(params[n], residual[n]) for n in rewritten)
    assert torch.equal(logits(model), trained)

    with pytest.raises(NotImplementedError, match="residual"):
        with peftspec.rows(model, ["default", None]):
            pass

    path = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, path)
    fresh = peftspec.load_adapter(copy.deepcopy(base), path)
    fresh_params = dict(fresh.named_parameters())
    assert all(torch.equal(fresh_params[n], residual[n]) for n in rewritten)
    assert torch.equal(logits(fresh), trained)

    # HF PEFT's export: a rank-2r LoRA against the original base
    folder = peftspec.export_hf_peft(path, tmp_path / "hf", model=copy.deepcopy(base))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert config["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    torch.testing.assert_close(logits(theirs), trained, atol=1e-5, rtol=0)

    merged = peftspec.merge(fresh)
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=0)
    peftspec.remove(model)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


def test_plan_states_the_residual_and_bad_combinations_are_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n'
                    'init = "olora"\n')
    res = CliRunner().invoke(cli, ["plan", str(path)])
    assert res.exit_code == 0, res.output
    assert "residual" in " ".join(res.output.split())
    res = CliRunner().invoke(cli, ["plan", str(path), "--json"])
    assert "residual" in json.loads(res.output)["base_notes"]["reparameterize[0]"]
    path.write_text('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n'
                    'init = "pissa"\ndora = true\n')
    res = CliRunner().invoke(cli, ["plan", str(path)])
    assert res.exit_code == 2 and "init 'pissa' works on Linear and Conv1D modules without " \
        "DoRA" in " ".join(res.output.split())
