"""Per-request sampling and the key/value cache of one sequence.

Greedy when ``temperature == 0``; otherwise softmax at the temperature,
nucleus-cut at ``top_p``, drawn with the request's own seeded generator, so a
request's tokens do not depend on what else shares its batch.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


def pick(logits: torch.Tensor, temperature: float, top_p: float,
         generator: torch.Generator | None) -> int:
    """One token id from a row of logits."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set reaching top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def cache_arg(model) -> str:
    """The forward argument that takes the cache: ``cache`` from transformers
    5.24 on, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of a transformers ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def batched_cache(model, seqs_kv: list[list[tuple[torch.Tensor, torch.Tensor]]],
                  lengths: list[int]):
    """One ``DynamicCache`` holding every sequence's keys and values, left-padded
    to the longest (the attention mask hides the padding)."""
    from transformers import DynamicCache

    width = max(lengths)
    cache = DynamicCache(config=model.config)
    for layer in range(len(seqs_kv[0])):
        ks = [F.pad(kv[layer][0], (0, 0, width - n, 0)) for kv, n in zip(seqs_kv, lengths)]
        vs = [F.pad(kv[layer][1], (0, 0, width - n, 0)) for kv, n in zip(seqs_kv, lengths)]
        cache.update(torch.cat(ks), torch.cat(vs), layer)
    return cache
