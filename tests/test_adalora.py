"""AdaLoRA against HF PEFT: counts, outputs, rank allocation step by step, format.

The allocation test trains the same tiny GPT-2 twice from the same triplets,
once under HF PEFT (``update_and_allocate`` after each step, its orthogonal
regularizer in the loss) and once under peftspec's hooks
(:func:`peftspec.training_hooks`), and requires the same kept triplets after
every step and the same outputs at the end."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import peftspec
from peftspec.cli import cli
from peftspec.core.errors import PeftspecError, SpecError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import gpt2, llama  # noqa: E402

HF_PREFIX = "base_model.model."


ARCHS = {"gpt2": (gpt2, ["c_attn", "c_fc"], True),
         "llama": (llama, ["q_proj", "v_proj", "down_proj"], False)}


def ids(seed=1, n=2):
    return torch.randint(0, 100, (n, 11), generator=torch.Generator().manual_seed(seed))


def spec(targets, **opts):
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in opts.items())
    return peftspec.parse_spec('[[reparameterize]]\nmethod = "adalora"\n'
                               f"modules = {json.dumps(['**.' + t for t in targets])}\n"
                               + extra)


def hf_model(base, targets, fan_in_fan_out, **kw):
    kw.setdefault("total_step", 10)
    # CAUSAL_LM: a plain PeftModel's forward skips AdaLoraModel.forward, and with it
    # the orthogonal regularizer
    cfg = peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=targets, fan_in_fan_out=fan_in_fan_out, **kw)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def copy_hf_into_ours(hf, ours):
    mine = peftspec.adapter_params(ours)
    n = 0
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.requires_grad:
                key = name.removeprefix(HF_PREFIX).replace(".default", "")
                mine[key].copy_(p)
                n += 1
    assert n == len(mine)


def randomize_hf(hf, seed=7):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_counts_and_outputs_match_hf_peft(arch):
    make, targets, fifo = ARCHS[arch]
    base = make()
    hf = hf_model(base, targets, fifo, init_r=6, target_r=3, lora_alpha=12).eval()
    ours = copy.deepcopy(base)
    before = logits(base, ids())
    peftspec.apply(spec(targets, init_r=6, target_r=3, alpha=12), ours)
    assert torch.equal(logits(ours, ids()), before)  # E = 0: unchanged, bit for bit
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert sum(p.numel() for p in peftspec.trainable_parameters(ours).values()) == n_hf
    assert peftspec.compile_plan(spec(targets, init_r=6, target_r=3), base).trainable_params \
        == n_hf
    randomize_hf(hf)
    copy_hf_into_ours(hf, ours)
    expected = logits(hf, ids())
    assert not torch.allclose(expected, before, atol=1e-2)
    torch.testing.assert_close(logits(ours.eval(), ids()), expected, atol=1e-5, rtol=0)
    # merge folds the same update; the merged weights load into a plain model
    merged = peftspec.merge(ours)
    torch.testing.assert_close(logits(merged, ids()), expected, atol=1e-5, rtol=0)
    plain = make()
    plain.load_state_dict(merged.state_dict())
    torch.testing.assert_close(logits(plain, ids()), expected, atol=1e-5, rtol=0)


def _train_both(tmp_path):
    """HF PEFT and peftspec trained side by side; returns both and the base."""
    base = gpt2()
    opts = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, beta1=0.8, beta2=0.9,
                orth_reg_weight=0.3)
    total = 12
    hf = hf_model(base, ["c_attn", "c_fc"], True, lora_alpha=16, total_step=total, **opts)
    ours = copy.deepcopy(base)
    peftspec.apply(spec(["c_attn", "c_fc"], alpha=16, **opts), ours)
    copy_hf_into_ours(hf, ours)
    # eval mode: GPT-2's dropout would draw differently in the two models
    hooks = peftspec.training_hooks(ours, total)
    opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=2e-2)
    opt_ours = torch.optim.AdamW(peftspec.trainable_parameters(ours).values(), lr=2e-2)
    modules = {n: m for n, m in ours.named_modules() if hasattr(m, "rank_mask")}
    kept = []
    for step in range(1, total + 1):
        x = ids(seed=step, n=4)
        hf(input_ids=x, labels=x).loss.backward()
        opt_hf.step()
        hf.base_model.update_and_allocate(step)
        opt_hf.zero_grad()
        loss = ours(input_ids=x, labels=x).loss + peftspec.train.hooks.extra_loss(hooks)
        loss.backward()
        opt_ours.step()
        for h in hooks:
            h.after_step(step)
        opt_ours.zero_grad()
        pattern = hf.peft_config["default"].rank_pattern
        if pattern:
            for name, m in modules.items():
                want = pattern[f"{name}.lora_E.default"]
                assert m.rank_mask.tolist() == want, (step, name)
        kept.append(sum(int(m.rank_mask.sum()) for m in modules.values()))
    return base, hf.eval(), ours.eval(), kept


def test_rank_allocation_follows_hf_peft_step_by_step(tmp_path):
    base, hf, ours, kept = _train_both(tmp_path)
    assert kept[0] == 16 and kept[-1] == 2 * 4  # init_r × 4 modules -> target_r × 4
    assert kept == sorted(kept, reverse=True)
    torch.testing.assert_close(logits(ours, ids()), logits(hf, ids()), atol=1e-4, rtol=0)

    # HF PEFT's format both ways: pruned triplets dropped, rank_pattern written
    peftspec.save_adapter(ours, tmp_path / "a.safetensors")
    folder = peftspec.export_hf_peft(tmp_path / "a.safetensors", tmp_path / "hf",
                                     model=copy.deepcopy(base))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4
    assert sum(sum(v) for v in config["rank_pattern"].values()) == 8
    shapes = {k: v.shape for k, v in load_file(folder / "adapter_model.safetensors").items()}
    assert sum(s[0] for k, s in shapes.items() if k.endswith("lora_E")) == 8
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    torch.testing.assert_close(logits(theirs, ids()), logits(ours, ids()), atol=1e-5, rtol=0)

    hf.save_pretrained(tmp_path / "hf-saved")
    back, _ = peftspec.import_hf_peft(tmp_path / "hf-saved", tmp_path / "b.safetensors",
                                      model=copy.deepcopy(base))
    loaded = peftspec.load_adapter(copy.deepcopy(base), back).eval()
    torch.testing.assert_close(logits(loaded, ids()), logits(hf, ids()), atol=1e-5, rtol=0)
    masks = {k: v for k, v in load_file(back).items() if k.endswith("rank_mask")}
    assert sum(int(v.sum()) for v in masks.values()) == 8


def test_save_load_remove_bit_exact_and_rows(tmp_path):
    base = gpt2()
    model = copy.deepcopy(base)
    peftspec.apply(spec(["c_attn"], init_r=4, target_r=2), model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peftspec.adapter_params(model).values():
            p.copy_(torch.randn(p.shape, generator=gen))
        m = model.transformer.h[0].attn.c_attn
        m.rank_mask = torch.tensor([True, False, True, False])
    out = logits(model, ids())
    peftspec.save_adapter(model, tmp_path / "a.safetensors")
    fresh = peftspec.load_adapter(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert torch.equal(logits(fresh, ids()), out)
    assert fresh.transformer.h[0].attn.c_attn.rank_mask.tolist() == [True, False, True, False]
    peftspec.load_adapter(fresh, tmp_path / "a.safetensors", name="b")
    with peftspec.rows(fresh, ["default", None, "b"]):
        mixed = logits(fresh, ids(n=3))
    alone = logits(fresh, ids(n=3))  # both adapters are the same file
    torch.testing.assert_close(mixed[1], logits(base, ids(n=3))[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[[0, 2]], alone[[0, 2]], atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[1], alone[1], atol=1e-3)
    peftspec.remove(model)
    assert torch.equal(logits(model, ids()), logits(base, ids()))


def test_bad_options_are_refused_with_the_rule():
    base = gpt2()
    with pytest.raises(SpecError, match="target_r = 9 exceeds init_r = 4"):
        peftspec.compile_plan(spec(["c_attn"], init_r=4, target_r=9), base)
    with pytest.raises(SpecError, match="leave no step"):
        peftspec.compile_plan(spec(["c_attn"], tinit=5, tfinal=5, total_step=10), base)
    model = copy.deepcopy(base)
    peftspec.apply(spec(["c_attn"], tinit=5, tfinal=5), model)
    with pytest.raises(PeftspecError, match="adalora.*leave no step of the 8 training steps"):
        peftspec.training_hooks(model, 8)


@pytest.mark.slow
def test_peftspec_train_allocates_the_budget_and_refuses_an_early_resume(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"the tide came in {i} times"})
                              for i in range(8)) + "\n")
    (tmp_path / "s.toml").write_text(
        '[[reparameterize]]\nmethod = "adalora"\nmodules = ["**.q_proj", "**.v_proj"]\n'
        'init_r = 4\ntarget_r = 1\ntinit = 1\ntfinal = 2\n'
        '[train_config]\nsteps = 6\nbatch_size = 2\nmax_length = 16\nlr = 0.02\n'
        'save_every = 2\n')
    out = tmp_path / "a.safetensors"
    res = CliRunner().invoke(cli, ["train", str(tmp_path / "s.toml"), "--data", str(data),
                                   "--out", str(out), "--log", str(tmp_path / "log.jsonl")])
    assert res.exit_code == 0, res.output
    masks = {k: v for k, v in load_file(out).items() if k.endswith("rank_mask")}
    assert masks and sum(int(v.sum()) for v in masks.values()) == len(masks)  # target_r = 1
    steps = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "train"]
    assert all(r["extra_loss"] > 0 for r in steps)  # the orthogonal regularizer
    res = CliRunner().invoke(cli, ["train", str(tmp_path / "s.toml"), "--data", str(data),
                                   "--out", str(out), "--resume",
                                   str(tmp_path / "a.checkpoints" / "step-00000002")])
    assert res.exit_code != 0 and "cannot resume an AdaLoRA run at step 2" in res.output
