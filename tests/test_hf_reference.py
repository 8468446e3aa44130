"""peftspec's LoRA family against HF PEFT as the reference implementation.

HF PEFT (``peft``, a test-only dependency) is the behaviour peftspec's LoRA,
rsLoRA and DoRA promise to reproduce. Each comparison builds the same tiny
transformers model twice, adapts one copy with a peftspec spec and the other
with ``peft.get_peft_model``, gives HF's adapter random non-zero weights
(B included, so the update is not zero and the comparison means something),
copies them into peftspec's tensors under the documented name mapping, and
compares outputs in eval mode:

================================================  ==========================
HF PEFT (``base_model.model.<path>.`` ...)        peftspec (``<path>.`` ...)
================================================  ==========================
``lora_A.default.weight`` (r, in)                 ``lora_A``
``lora_B.default.weight`` (out, r)                ``lora_B``
``lora_magnitude_vector.default.weight`` (out,)   ``lora_magnitude``
``lora_embedding_A.default`` (r, num_embeddings)  ``lora_A``
``lora_embedding_B.default`` (dim, r)             ``lora_B``
================================================  ==========================

GPT-2 exercises ``Conv1D`` (HF needs ``fan_in_fan_out=True`` there), Llama
``nn.Linear``; both exercise ``nn.Embedding``. Merge equivalence is checked as
torchtune's tests do: the merged state dict, loaded into a fresh plain model
of the same config, gives the same outputs.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftspec  # noqa: E402

ATOL = 1e-5
HF_PREFIX = "base_model.model."
# HF PEFT's tensor suffix -> peftspec's tensor name on the same module path
HF_TO_PEFTSPEC = {
    "lora_A.default.weight": "lora_A",
    "lora_B.default.weight": "lora_B",
    "lora_magnitude_vector.default.weight": "lora_magnitude",
    "lora_embedding_A.default": "lora_A",
    "lora_embedding_B.default": "lora_B",
}


def _gpt2_config():
    return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                   n_positions=64)


def _llama_config():
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=100)


@dataclass(frozen=True)
class Arch:
    name: str
    config: Callable[[], object]
    cls_name: str
    targets: tuple[str, ...]      # leaf names of the Linear / Conv1D modules to adapt
    embedding: str                # leaf name of the input embedding
    fan_in_fan_out: bool

    def fresh(self, seed: int = 0) -> nn.Module:
        """A plain model with seeded random weights, in eval mode."""
        torch.manual_seed(seed)
        return getattr(transformers, self.cls_name)(self.config()).eval()


GPT2 = Arch("gpt2", _gpt2_config, "GPT2LMHeadModel", ("c_attn", "c_proj", "c_fc"), "wte",
            fan_in_fan_out=True)
LLAMA = Arch("llama", _llama_config, "LlamaForCausalLM",
             ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             "embed_tokens", fan_in_fan_out=False)
ARCHS = pytest.mark.parametrize("arch", [GPT2, LLAMA], ids=lambda a: a.name)

# (id, r, alpha, rslora, dora, adapt the embedding too)
VARIANTS = [
    ("lora-alpha!=r", 4, 10, False, False, False),
    ("rslora", 4, 6, True, False, False),
    ("dora", 4, 8, False, True, False),
    ("dora-rslora", 8, 4, True, True, False),
    ("embedding-lora", 4, 8, False, False, True),
]
VARIANT_IDS = [v[0] for v in VARIANTS]


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _spec_text(modules, r, alpha, rslora=False, dora=False) -> str:
    return (
        "[[reparameterize]]\n"
        'method = "lora"\n'
        f"modules = {json.dumps(['**.' + m for m in modules])}\n"
        f"r = {r}\nalpha = {alpha}\n"
        f"rslora = {str(rslora).lower()}\ndora = {str(dora).lower()}\n"
    )


def _spec(arch: Arch, r, alpha, rslora=False, dora=False, embedding=False, linear=True):
    """The peftspec spec equivalent to :func:`_hf_model`'s LoraConfig.

    Embedding LoRA is its own rule (peftspec refuses DoRA on embeddings; no
    variant combines ``dora`` with the embedding).
    """
    text = _spec_text(arch.targets, r, alpha, rslora, dora) if linear else ""
    if embedding:
        text += "\n" + _spec_text([arch.embedding], r, alpha, rslora)
    return peftspec.parse_spec(text)


def _peftspec_model(arch: Arch, base: nn.Module, *args, **kwargs) -> nn.Module:
    """``base`` deep-copied and adapted by peftspec."""
    model = copy.deepcopy(base)
    peftspec.apply(_spec(arch, *args, **kwargs), model)
    return model.eval()


def _hf_model(arch: Arch, base: nn.Module, r, alpha, rslora=False, dora=False,
              embedding=False, linear=True) -> nn.Module:
    targets = list(arch.targets) if linear else []
    if embedding:
        targets.append(arch.embedding)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=dora,
                          lora_dropout=0.0, target_modules=targets,
                          fan_in_fan_out=arch.fan_in_fan_out)
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


def _randomize_hf_adapter(hf: nn.Module, seed: int) -> None:
    """Random non-zero A and B; magnitudes scaled by random factors around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def _hf_adapter_as_peftspec(hf: nn.Module) -> dict[str, torch.Tensor]:
    """HF PEFT's adapter tensors, renamed to peftspec's names."""
    out = {}
    for name, p in hf.named_parameters():
        if not p.requires_grad:
            continue
        assert name.startswith(HF_PREFIX), name
        path = name[len(HF_PREFIX):]
        for suffix, ours in HF_TO_PEFTSPEC.items():
            if path.endswith("." + suffix):
                out[path[: -len(suffix)] + ours] = p.detach()
                break
        else:
            raise AssertionError(f"unmapped HF PEFT trainable tensor {name}")
    return out


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    ours = peftspec.adapter_params(model)
    assert set(ours) == set(tensors), (sorted(set(ours) ^ set(tensors)))
    with torch.no_grad():
        for name, p in ours.items():
            assert p.shape == tensors[name].shape, name
            p.copy_(tensors[name])


def _n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _randomize_peftspec_adapter(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peftspec.adapter_params(model).items():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("lora_magnitude"):
                p.mul_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


# --------------------------------------------------------------------------- outputs


@ARCHS
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_outputs_match_hf_peft(arch, variant):
    _, r, alpha, rslora, dora, embedding = variant
    base = arch.fresh()
    ids = _ids()
    hf = _hf_model(arch, base, r, alpha, rslora, dora, embedding)
    _randomize_hf_adapter(hf, seed=7)
    ours = _peftspec_model(arch, base, r, alpha, rslora, dora, embedding)
    _copy_into(ours, _hf_adapter_as_peftspec(hf))

    expected, actual = _logits(hf, ids), _logits(ours, ids)
    # the adapter must matter, or agreeing with HF would prove nothing
    assert not torch.allclose(_logits(base, ids), expected, atol=1e-2)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@ARCHS
def test_embedding_only_lora_matches_hf_peft(arch):
    """LoRA on the input embedding alone (the embedding path in isolation)."""
    base = arch.fresh()
    ids = _ids(seed=3)
    hf = _hf_model(arch, base, r=3, alpha=5, embedding=True, linear=False)
    _randomize_hf_adapter(hf, seed=11)
    ours = _peftspec_model(arch, base, r=3, alpha=5, embedding=True, linear=False)
    tensors = _hf_adapter_as_peftspec(hf)
    emb_path = next(n for n, m in base.named_modules() if n.endswith(arch.embedding))
    assert tensors[f"{emb_path}.lora_A"].shape == (3, 100)
    assert tensors[f"{emb_path}.lora_B"].shape == (32, 3)
    _copy_into(ours, tensors)

    expected = _logits(hf, ids)
    assert not torch.allclose(_logits(base, ids), expected, atol=1e-2)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- counts


@ARCHS
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_trainable_parameter_count_matches_hf_peft(arch, variant):
    _, r, alpha, rslora, dora, embedding = variant
    base = arch.fresh()
    hf = _hf_model(arch, base, r, alpha, rslora, dora, embedding)
    ours = _peftspec_model(arch, base, r, alpha, rslora, dora, embedding)
    n_hf = _n_trainable(hf)
    assert n_hf > 0
    assert _n_trainable(ours) == n_hf
    assert sum(p.numel() for p in peftspec.trainable_parameters(ours).values()) == n_hf
    # the plan's estimate, made before anything is applied, agrees too
    plan = peftspec.compile_plan(_spec(arch, r, alpha, rslora, dora, embedding), base)
    assert plan.trainable_params == n_hf


# --------------------------------------------------------------------------- zero init


@ARCHS
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_zero_init_leaves_outputs_bit_identical(arch, dora):
    base = arch.fresh()
    ids = _ids(seed=5)
    before = _logits(base, ids)
    model = copy.deepcopy(base)
    peftspec.apply(peftspec.parse_spec(_spec_text(arch.targets, 4, 8, dora=dora)), model)
    assert peftspec.is_patched(model)
    assert len(peftspec.adapter_params(model)) > 0
    assert torch.equal(_logits(model, ids), before)


@ARCHS
def test_zero_init_embedding_lora_leaves_outputs_bit_identical(arch):
    base = arch.fresh()
    ids = _ids(seed=5)
    before = _logits(base, ids)
    model = _peftspec_model(arch, base, r=4, alpha=8, embedding=True)
    assert torch.equal(_logits(model, ids), before)


# --------------------------------------------------------------------------- merge


def _is_lora_module(m: nn.Module) -> bool:
    return callable(getattr(m, "adapter_params", None)) or type(m).__name__.startswith("LoRA")


# GPT-2 ties lm_head to wte: folding an embedding update into wte changes the
# output head too (HF PEFT's merge_and_unload does the same), so embedding merge
# is checked on Llama, whose embeddings are untied.
MERGE_CASES = [
    (GPT2, False, False), (GPT2, True, False),
    (LLAMA, False, False), (LLAMA, True, False), (LLAMA, False, True),
]


@pytest.mark.parametrize("arch,dora,embedding", MERGE_CASES,
                         ids=["gpt2-lora", "gpt2-dora", "llama-lora", "llama-dora",
                              "llama-embedding"])
def test_merge_equals_unmerged_and_loads_into_plain_model(arch, dora, embedding):
    base = arch.fresh()
    assert embedding is False or not base.config.tie_word_embeddings
    ids = _ids(seed=9)
    model = _peftspec_model(arch, base, r=4, alpha=8, dora=dora, embedding=embedding)
    _randomize_peftspec_adapter(model, seed=13)
    unmerged = _logits(model, ids)
    assert not torch.allclose(unmerged, _logits(base, ids), atol=1e-2)

    merged_model = peftspec.merge(model)
    assert merged_model is model
    assert not peftspec.is_patched(model)
    assert not any(_is_lora_module(m) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=ATOL, rtol=0)

    # as torchtune checks it: the merged weights in a plain model of the same config
    plain = arch.fresh(seed=123)
    state = model.state_dict()
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    torch.testing.assert_close(_logits(plain, ids), unmerged, atol=ATOL, rtol=0)


@ARCHS
def test_merge_matches_hf_merge_and_unload(arch):
    """Merged weights agree with HF PEFT's merge_and_unload (DoRA, rsLoRA)."""
    base = arch.fresh()
    hf = _hf_model(arch, base, r=4, alpha=6, rslora=True, dora=True)
    _randomize_hf_adapter(hf, seed=17)
    ours = _peftspec_model(arch, base, r=4, alpha=6, rslora=True, dora=True)
    _copy_into(ours, _hf_adapter_as_peftspec(hf))
    hf_state = hf.merge_and_unload().state_dict()
    our_state = peftspec.merge(ours).state_dict()
    assert set(our_state) == set(hf_state)
    for name, t in our_state.items():
        torch.testing.assert_close(t, hf_state[name], atol=ATOL, rtol=0, msg=name)
