"""How a soft prompt reaches the model: a forward pre-hook that rewrites its inputs."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .kv_cache import cache_arg, cache_len, with_prefix
from .modules import SoftPrompt


class Rewriter:
    """The forward pre-hook (with kwargs) on the whole model that puts the soft prompt
    in front of its inputs (see the package docstring for what it rewrites)."""

    def __init__(self, model: nn.Module, prompt: SoftPrompt, embedding: nn.Module, kind: str,
                 geometry: tuple[int, int, int] | None, rows: list | None = None):
        self.sig = inspect.signature(model.forward)
        self.prompt = prompt
        # per-row mode: rows[i] is row i's SoftPrompt, or None for a row without one
        self.rows = rows
        self.embedding = embedding
        self.kind = kind  # "prompt" or "prefix"
        self.geometry = geometry
        self.model = model  # for the cache's kind and error messages (not a submodule)
        self.cache_arg = cache_arg(self.sig)  # 'cache' (transformers >= 5.24) or 'past_key_values'

    def _kwargs(self, args, kwargs) -> dict[str, Any]:
        bound = self.sig.bind_partial(*args, **kwargs)
        out: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if self.sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out

    def __call__(self, module, args, kwargs):
        kw = self._kwargs(args, kwargs)
        n = self.prompt.tokens
        # a cached decoding step: the prompt is already in the cache. (With
        # use_cache=False a model may still hand back the cache we injected, and
        # generate() passes it in again: it holds nothing to reuse then.)
        past = kw.get(self.cache_arg) if self.cache_arg else None
        decoding = kw.get("use_cache") is not False and cache_len(past, self.model) > 0
        if kw.get("use_cache") is False and self.kind == "prefix":
            kw[self.cache_arg] = past = None
        ref = kw.get("input_ids")
        if ref is None:
            ref = kw.get("inputs_embeds")
        if ref is None:
            return None
        b = ref.shape[0]
        mask = kw.get("attention_mask")
        slots = None
        if self.rows is not None and not decoding:
            # rows without a prompt get masked slots; positions count unmasked slots
            slots = torch.tensor([[p is not None] * n for p in self.rows], device=ref.device)
            if mask is None:
                mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
            if kw.get("position_ids") is None and "position_ids" in self.sig.parameters:
                ext = torch.cat([slots.to(mask.dtype), mask], dim=1)
                kw["position_ids"] = ((ext.long().cumsum(-1) - 1).clamp(min=0))[:, n:] - n
        if mask is not None and mask.dim() == 2:
            lead = mask.new_ones(b, n) if slots is None else slots.to(mask.dtype)
            kw["attention_mask"] = torch.cat([lead, mask], dim=1)
        pos = kw.get("position_ids")
        if decoding:
            if pos is not None:
                kw["position_ids"] = pos + n
            return (), kw
        if self.kind == "prompt":
            ids = kw.pop("input_ids", None)
            emb = kw.get("inputs_embeds")
            if emb is None:
                emb = self.embedding(ids)
            if self.rows is None:
                table = self.prompt.table().to(emb.dtype).unsqueeze(0).expand(b, -1, -1)
            else:
                zeros = emb.new_zeros(n, emb.shape[-1])
                table = torch.stack([zeros if p is None else p.table().to(emb.dtype)
                                     for p in self.rows])
            kw["inputs_embeds"] = torch.cat([table, emb], dim=1)
            if pos is not None:
                lead = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(b, n)
                kw["position_ids"] = torch.cat([lead, pos + n], dim=1)
            labels = kw.get("labels")
            if labels is not None and labels.dim() == 2:  # not a classifier's (batch,)
                kw["labels"] = torch.cat([labels.new_full((b, n), -100), labels], dim=1)
            tti = kw.get("token_type_ids")
            if tti is not None:
                kw["token_type_ids"] = torch.cat([tti.new_zeros(b, n), tti], dim=1)
        else:
            if pos is not None:
                kw["position_ids"] = pos + n
            kw[self.cache_arg] = self._prefix_cache(b, past, ref)
        return (), kw

    def _prefix_cache(self, b: int, cache, ref: torch.Tensor):
        layers, heads, hd = self.geometry
        n = self.prompt.tokens
        table = self.prompt.table()
        dtype = ref.dtype if ref.is_floating_point() else table.dtype
        # HF PEFT's layout: (n, layers·2·heads·hd) -> per layer (key, value), each
        # (batch, heads, n, hd)
        kv = table.view(n, layers * 2, heads, hd).permute(1, 2, 0, 3).to(dtype)
        kv = kv.unsqueeze(1).expand(-1, b, -1, -1, -1)  # (layers·2, b, heads, n, hd)
        pairs = [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]
        return with_prefix(pairs, cache, self.model)
