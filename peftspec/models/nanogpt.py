"""The built-in default model: a small nanoGPT-shaped causal language model.

One readable file, as Karpathy's nanoGPT: token and position embeddings,
pre-norm transformer blocks with separate ``q_proj``/``k_proj``/``v_proj``/
``o_proj`` attention projections and an ``up_proj``/``down_proj`` MLP, a final
LayerNorm and an LM head tied to the token embedding. The initialisation is
deterministic (its own seeded generator), so ``--model default`` is the same
model on every machine, and nothing is downloaded. Module names::

    tok_emb, pos_emb, blocks.{i}.ln1, blocks.{i}.attn.{q,k,v,o}_proj,
    blocks.{i}.ln2, blocks.{i}.mlp.{up,down}_proj, ln_f, lm_head

:class:`GPTForSequenceClassification` is the same network with a ``score``
head (``n_embd -> num_labels``, no bias) in place of the LM head, reading
the last attended position, as transformers' ``GPT2ForSequenceClassification``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 257  # 256 bytes + end-of-text, for the byte-level tokenizer
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    seed: int = 0


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class SequenceClassifierOutput:
    logits: torch.Tensor  # (batch, num_labels)
    loss: torch.Tensor | None = None
    past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.n_embd
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.bias)
        self.o_proj = nn.Linear(d, d, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``past``: cached (key, value), each (batch, heads, P, head_dim), that the
        queries may attend to before the current tokens. Returns (output, (k, v))."""
        b, t, d = x.shape
        h = self.n_head

        def heads(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.down_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past=None,
                use_cache: bool = False):
        """Returns (output, this layer's (key, value) with ``use_cache``, else None:
        a block that returns views of its activations for nothing keeps them alive
        and trips FSDP2's "returned a view tensor" warning)."""
        a, present = self.attn(self.ln1(x), mask, past)
        x = x + a
        return x + self.mlp(self.ln2(x)), (present if use_cache else None)


class GPT(nn.Module):
    """A causal LM taking ``input_ids`` (or ``inputs_embeds``), ``attention_mask``
    and ``labels`` like a transformers model, returning :class:`CausalLMOutput`."""

    def __init__(self, cfg: GPTConfig = GPTConfig()):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self._init_weights(cfg)

    @torch.no_grad()
    def _init_weights(self, cfg: GPTConfig) -> None:
        gen = torch.Generator().manual_seed(cfg.seed)
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("ln1.weight") or name.endswith("ln2.weight")
                        or name == "ln_f.weight" else 0.0)
            else:
                std = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask=None, labels=None,
                inputs_embeds: torch.Tensor | None = None, past_key_values=None,
                position_ids: torch.Tensor | None = None,
                use_cache: bool = False) -> CausalLMOutput:
        """Run the model.

        Args:
            input_ids: (batch, T) token ids, or give ``inputs_embeds`` (batch, T, d).
            attention_mask: (batch, P + T), 1 for tokens to attend to, covering the
                cached positions too (as in transformers).
            labels: (batch, T) targets, shifted inside; -100 is ignored.
            past_key_values: per layer, cached (key, value) of shape
                (batch, heads, P, head_dim), e.g. from ``use_cache=True`` or a
                prefix-tuning method.
            position_ids: (batch, T); by default counted from the attention mask
                (left padding safe), else from P.
            use_cache: return ``past_key_values`` for the next call.
        """
        x, presents = self._hidden(input_ids, attention_mask, inputs_embeds, past_key_values,
                                   position_ids, use_cache)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss,
                              past_key_values=presents if use_cache else None)

    def _hidden(self, input_ids, attention_mask, inputs_embeds, past_key_values, position_ids,
                use_cache: bool = False):
        """The final hidden states (after ``ln_f``) and each layer's (key, value)
        (None for each layer without ``use_cache``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if past_len + t > self.config.block_size:
            raise ValueError(f"sequence of {past_len + t} positions is longer than block_size "
                             f"{self.config.block_size}")
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:  # packed rows: as given
            if past_len:
                raise ValueError("a 4-D attention_mask (packed rows) does not go with "
                                 "past_key_values")
            if position_ids is None:
                raise ValueError("a 4-D attention_mask (packed rows) needs position_ids")
            mask = attention_mask.to(torch.bool)  # (batch, 1, T, T)
        elif attention_mask is not None:
            am = attention_mask.to(torch.bool)
            if am.shape[1] != past_len + t:
                raise ValueError(f"attention_mask covers {am.shape[1]} positions; expected "
                                 f"{past_len + t} (cached {past_len} + current {t})")
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
            q_pos = torch.arange(past_len, past_len + t, device=x.device)
            k_pos = torch.arange(past_len + t, device=x.device)
            causal = k_pos[None, :] <= q_pos[:, None]
            mask = causal[None] & am[:, None, :]
            # a fully masked row (a padding query) would give NaN: let it see itself
            mask = mask | (k_pos[None, None, :] == q_pos[None, :, None])
            mask = mask[:, None]
        elif past_len:
            q_pos = torch.arange(past_len, past_len + t, device=x.device)
            mask = (torch.arange(past_len + t, device=x.device)[None, :] <= q_pos[:, None])
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + t, device=x.device).expand(b, t)
        x = self.drop(x + self.pos_emb(position_ids))
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, mask, past_key_values[i] if past_key_values else None,
                               use_cache)
            presents.append(present)
        return self.ln_f(x), presents

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding; returns the prompt followed by the new tokens."""
        ids = input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        past, step_ids = None, ids
        for _ in range(max_new_tokens):
            out = self(step_ids if use_cache else ids, attention_mask=mask,
                       past_key_values=past if use_cache else None, use_cache=use_cache)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            past, step_ids = out.past_key_values, nxt
        return ids


class GPTForSequenceClassification(GPT):
    """The default model with a sequence classification head, ``score``.

    The transformer is :class:`GPT`'s, initialised the same way (its own
    seeded generator, so it is the same base on every machine); ``score``
    (``num_labels x n_embd``, no bias, std 0.02) is drawn from torch's global
    generator, like any new ``nn.Linear``: seed it for a reproducible head.
    There is no LM head. The logits are ``score`` of the hidden state at each
    row's last attended position (the last 1 of ``attention_mask``, the last
    position without one), so right padding never reaches the head; with
    ``labels`` (``(batch,)`` class ids) the loss is their cross-entropy.
    """

    peftspec_new_parameters = ("score.weight",)

    def __init__(self, cfg: GPTConfig = GPTConfig(), num_labels: int = 2):
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {num_labels}")
        super().__init__(cfg)
        del self.lm_head
        self.num_labels = num_labels
        self.score = nn.Linear(cfg.n_embd, num_labels, bias=False)
        with torch.no_grad():
            self.score.weight.normal_(0.0, 0.02)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask=None, labels=None,
                inputs_embeds: torch.Tensor | None = None, past_key_values=None,
                position_ids: torch.Tensor | None = None,
                use_cache: bool = False) -> SequenceClassifierOutput:
        """As :meth:`GPT.forward`; ``labels`` are (batch,) class ids."""
        x, presents = self._hidden(input_ids, attention_mask, inputs_embeds, past_key_values,
                                   position_ids, use_cache)
        b, t, _ = x.shape
        if attention_mask is None:
            last = torch.full((b,), t - 1, dtype=torch.long, device=x.device)
        else:
            am = attention_mask[:, -t:].to(torch.long)
            last = (am * torch.arange(t, device=x.device)).argmax(-1)
        logits = self.score(x[torch.arange(b, device=x.device), last])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.reshape(-1))
        return SequenceClassifierOutput(logits=logits, loss=loss,
                                        past_key_values=presents if use_cache else None)

    def generate(self, *args, **kwargs):
        raise TypeError("GPTForSequenceClassification has no LM head; it does not generate")
