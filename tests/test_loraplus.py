"""LoRA+ (``[train_config] loraplus_lr_ratio``): B factors at lr × ratio, as HF PEFT.

The learning rate each trainable tensor gets is compared with HF PEFT's
``create_loraplus_optimizer`` on the same tiny GPT-2 (LoRA on Conv1D, DoRA's
1-D magnitudes, LoRA on the embedding), and the training loop is checked to
keep those ratios through its schedule."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftspec
from peftspec.core.errors import SpecError
from peftspec.models.nanogpt import GPT, GPTConfig
from peftspec.core.train_config import TrainConfig
from peftspec.train.run import Run
from peftspec.train.optim import param_groups

SPEC = """
[[reparameterize]]
method = "lora"
modules = ["**.c_attn"]
r = 4
dora = true
[[reparameterize]]
method = "lora"
modules = ["**.wte"]
r = 2
"""


def _lr_by_param(optimizer_or_groups) -> dict[int, float]:
    groups = getattr(optimizer_or_groups, "param_groups", optimizer_or_groups)
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def test_learning_rates_match_hf_peft_create_loraplus_optimizer():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, target_modules=["c_attn", "wte"], use_dora=False, fan_in_fan_out=True))
    opt = create_loraplus_optimizer(hf, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                    loraplus_lr_embedding=1e-5)
    theirs = _lr_by_param(opt)
    hf_names = {n.removeprefix("base_model.model."): theirs[id(p)]
                for n, p in hf.named_parameters() if p.requires_grad}

    ours = copy.deepcopy(base)
    peftspec.apply(peftspec.parse_spec(SPEC.replace("dora = true", "").replace("r = 2", "r = 4")),
                   ours)
    params = peftspec.trainable_parameters(ours)
    cfg = TrainConfig.resolve(lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5)
    mine = _lr_by_param(param_groups(ours, params, cfg))
    rename = {"lora_A.default.weight": "lora_A", "lora_B.default.weight": "lora_B",
              "lora_embedding_A.default": "lora_A", "lora_embedding_B.default": "lora_B"}
    expected = {}
    for name, lr in hf_names.items():
        suffix = next(s for s in rename if name.endswith(s))
        expected[name[: -len(suffix)] + rename[suffix]] = lr
    got = {n: mine[id(p)] for n, p in params.items()}
    if _peft_version(peft) < (0, 21):
        # peft 0.18 (the oldest admitted) left LoRA's embedding factors at the base lr
        # (its embedding group missed them); peftspec follows 0.21's grouping, checked
        # in full where that version runs
        emb = {n for n in expected if ".wte." in n}
        assert {n: lr for n, lr in expected.items() if n in emb} == \
            pytest.approx({n: 1e-3 for n in emb})
        got = {n: v for n, v in got.items() if n not in emb}
        expected = {n: v for n, v in expected.items() if n not in emb}
    assert got == pytest.approx(expected, rel=1e-12)


def _peft_version(peft) -> tuple[int, int]:
    return tuple(int(x) for x in peft.__version__.split(".")[:2])
    assert {round(v, 9) for v in got.values()} == {1e-3, 16e-3, 1e-5}


def test_dora_magnitudes_and_1d_tensors_go_with_b_as_in_hf_peft():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    spec = ('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\nr = 2\n'
            'dora = true\n[[train]]\nparams = ["**.ln_f.weight"]')
    peftspec.apply(peftspec.parse_spec(spec), model)
    params = peftspec.trainable_parameters(model)
    cfg = TrainConfig.resolve(lr=2e-3, loraplus_lr_ratio=4, weight_decay=0.1)
    groups = param_groups(model, params, cfg)
    lr = _lr_by_param(groups)
    by_name = {n: lr[id(p)] for n, p in params.items()}
    for name, value in by_name.items():
        want = 2e-3 if name.endswith("lora_A") else 8e-3
        assert value == pytest.approx(want), name
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert all(decay[id(p)] == (0.1 if p.dim() >= 2 else 0.0) for p in params.values())


def test_without_loraplus_the_groups_are_the_plain_two():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    peftspec.apply(peftspec.parse_spec(SPEC.replace("**.c_attn", "**.q_proj")
                                       .replace("**.wte", "tok_emb")), model)
    groups = param_groups(model, peftspec.trainable_parameters(model),
                          TrainConfig.resolve(lr=1e-3))
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]
    assert [all(p.dim() >= 2 for p in g["params"]) for g in groups] == [True, False]


def test_the_loop_keeps_the_ratio_through_the_schedule(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"sample {i} of the tide"})
                              for i in range(6)) + "\n")
    spec = peftspec.parse_spec(
        '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\nr = 2\n'
        '[train_config]\nloraplus_lr_ratio = 8\n', file=str(tmp_path / "s.toml"))
    cfg = TrainConfig.resolve(spec.train_config, tmp_path, data=str(data), steps=4,
                              warmup=2, lr=1e-2, batch_size=2, max_length=16)
    assert cfg.loraplus_lr_ratio == 8.0
    run = Run(spec, cfg, model=GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)))
    names = {id(p): n for n, p in peftspec.trainable_parameters(run.model).items()}
    for _ in range(3):
        record = run.train_step()
        lrs = {names[id(p)]: g["lr"] for g in run.optimizer.param_groups for p in g["params"]}
        for name, lr in lrs.items():
            want = record["lr"] * (8 if name.endswith("lora_B") else 1)
            assert lr == pytest.approx(want), name


def test_a_ratio_below_one_is_refused_with_its_line():
    with pytest.raises(SpecError) as exc:
        peftspec.parse_spec('[train_config]\nloraplus_lr_ratio = 0.5\n', file="s.toml")
    assert "s.toml" in str(exc.value) and "loraplus_lr_ratio" in str(exc.value)
    assert "at least 1" in str(exc.value)


def test_the_cli_takes_the_ratio_and_logs_the_b_rate(tmp_path):
    from click.testing import CliRunner

    from peftspec.cli import cli

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"sample {i}"}) for i in range(4)) + "\n")
    (tmp_path / "s.toml").write_text('[[reparameterize]]\nmethod = "lora"\n'
                                     'modules = ["**.q_proj"]\nr = 2\n')
    res = CliRunner().invoke(cli, ["train", str(tmp_path / "s.toml"), "--data", str(data),
                                   "--out", str(tmp_path / "a.safetensors"), "--steps", "2",
                                   "--batch-size", "2", "--max-length", "16",
                                   "--loraplus-lr-ratio", "16", "--json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["train", str(tmp_path / "s.toml"), "--data", str(data),
                                   "--out", str(tmp_path / "a.safetensors"),
                                   "--loraplus-lr-ratio", "0.5"])
    assert res.exit_code == 2 and "loraplus_lr_ratio" in res.output
