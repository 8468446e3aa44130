"""A Llama causal LM in plain torch, for a start-up that does not import transformers.

``peftspec train`` uses it for ``smollm2`` and ``gguf:`` sources where it covers
the run (:mod:`peftspec.models.native`): importing transformers is ~2.4 s of a
warm 4.2 s start. The module tree and parameter names are transformers'
``LlamaForCausalLM``'s (``model.layers.N.self_attn.q_proj`` ...), so specs,
adapter files and HF PEFT exports are the same; the forward follows
transformers' operation for operation (RMSNorm in float32, rotary in float32,
SDPA with the key/value heads repeated, the shifted mean cross-entropy).
``tests/test_native_llama.py`` compares logits and loss with transformers'
model: equal bit for bit on SmolLM2, also with left padding.

Covered: ``rope_type = "default"``, no attention or MLP bias, SiLU,
``pretraining_tp = 1``; anything else is refused (:func:`supported`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        problem = supported(d)
        if problem:
            raise ValueError(problem)
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        heads = d["num_attention_heads"]
        return cls(d["vocab_size"], d["hidden_size"], d["intermediate_size"],
                   d["num_hidden_layers"], heads, d.get("num_key_value_heads") or heads,
                   d.get("head_dim") or d["hidden_size"] // heads, d["rms_norm_eps"],
                   float(theta), bool(d.get("tie_word_embeddings", False)))


def supported(d: dict) -> str | None:
    """Why this config is not covered, or ``None``."""
    if d.get("model_type") != "llama":
        return f"model_type {d.get('model_type')!r} is not 'llama'"
    rope = d.get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default" or d.get("rope_scaling"):
        return "only the default rotary embedding is covered"
    if d.get("attention_bias") or d.get("mlp_bias"):
        return "attention or MLP biases are not covered"
    if d.get("hidden_act", "silu") != "silu":
        return f"hidden_act {d.get('hidden_act')!r} is not 'silu'"
    if d.get("pretraining_tp", 1) != 1:
        return "pretraining_tp != 1 is not covered"
    return None


class LlamaRMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (c.num_attention_heads,
                                                    c.num_key_value_heads, c.head_dim)
        self.q_proj = nn.Linear(c.hidden_size, self.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        if rep > 1:  # as transformers' repeat_kv
            k = k[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(
                b, self.heads, s, self.head_dim)
            v = v[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(
                b, self.heads, s, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             is_causal=mask is None and s > 1,
                                             scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class SiLUActivation(nn.Module):
    """transformers' ``act_fn`` module for ``hidden_act = "silu"`` (same name and
    place, so that names and ``type:`` selectors match in both models)."""

    def forward(self, x):
        return F.silu(x)


class LlamaMLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act_fn = SiLUActivation()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64)
                                      .to(torch.float32) / c.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        # transformers keeps a copy (for dynamic rotary types); the base fingerprint
        # of an adapter file lists buffers too, so the native model holds it as well
        self.register_buffer("original_inv_freq", inv.clone(), persistent=False)

    def forward(self, x, positions):
        # in float32 even under autocast, as transformers does: a bf16 matmul here
        # would round the rotation angles of later positions
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = (self.inv_freq[None, :, None].float() @ positions[:, None, :].float()
                     ).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(x.dtype), sin.to(x.dtype)


class LlamaModel(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(c)


class LlamaForCausalLM(nn.Module):
    """``transformers.LlamaForCausalLM``'s names and forward for training:
    ``forward(input_ids, attention_mask=None, labels=None, inputs_embeds=None,
    position_ids=None)`` returns an object with ``loss`` (when ``labels``) and
    ``logits``. A 4-D boolean ``attention_mask`` (packed rows,
    :mod:`peftspec.data.packing`) is used as it is."""

    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.model = LlamaModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None,
                position_ids=None, **_):
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = x.shape
        positions = position_ids if position_ids is not None else \
            torch.arange(s, device=x.device).unsqueeze(0).expand(b, -1)
        cos, sin = self.model.rotary_emb(x, positions)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:  # packed: as given
            mask = attention_mask.bool()
        elif attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        logits = self.lm_head(self.model.norm(x))
        loss = None
        if labels is not None:
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                   shifted.reshape(-1).to(logits.device), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def load(folder: str | Path, config: dict | None = None) -> LlamaForCausalLM:
    """The model of a peftspec cache folder (config.json + model.safetensors),
    built on the meta device and given the file's tensors (no copy, no init);
    ``config``: the folder's config.json, where the caller has read it already."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if config is None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    c = Config.from_dict(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(c)
    state = load_file(folder / "model.safetensors")
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (c.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{folder}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if c.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(c)  # its buffer was on the meta device
    return model
