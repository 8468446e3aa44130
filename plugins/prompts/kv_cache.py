"""The key/value-cache API of the model at hand, found by capability, not version.

Soft prompts must know two things about a causal LM's cache: whether a call
is a cached decoding step (the prompt is then already in the cache), and, for
prefix tuning, how to hand the model a cache that already holds the prefixes.
transformers has changed both more than once:

* the forward argument was ``past_key_values`` until 5.23 and is ``cache``
  from 5.24 on (``past_key_values`` still reaches it through a deprecation
  shim, but a hook that reads only that name misses every decoding step);
* models take ``Cache`` objects (``DynamicCache``) in 5.x and in 4.x models
  that declare ``_supports_cache_class = True``; other 4.x models (GPT-2 in
  4.40) take the legacy tuple of per-layer ``(key, value)`` pairs;
* ``DynamicCache`` takes the model's config from 5.x on, nothing before.

So nothing here compares version strings: it reads the forward signature and
the classes' own attributes. A model whose cache this module cannot read is
an error naming its class and the installed transformers version, never a
silent guess (a wrong guess re-prepends the prompt at every decoding step and
generates wrong tokens).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

# The names the cache argument has had, newest first.
CACHE_ARGS = ("cache", "past_key_values")


class CacheAPIError(ValueError):
    """The model's cache is of a form peftspec does not know."""


def transformers_version() -> str:
    try:
        from importlib.metadata import version

        return version("transformers")
    except Exception:  # noqa: BLE001 - not installed, or no metadata
        return "not installed"


def describe(model: nn.Module) -> str:
    """'LlamaForCausalLM (transformers 5.24.0)', for error messages."""
    name = type(model).__name__
    if type(model).__module__.startswith("transformers."):
        return f"{name} (transformers {transformers_version()})"
    return name


def cache_arg(sig: inspect.Signature) -> str | None:
    """The forward parameter that carries the KV cache, or None if there is none."""
    params = sig.parameters
    return next((n for n in CACHE_ARGS if n in params), None)


def cache_len(past, model: nn.Module) -> int:
    """Positions already in ``past`` (0 for no cache)."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (list, tuple)):
        if not past or past[0] is None:
            return 0
        first = past[0]
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], torch.Tensor) \
                and first[0].dim() == 4:
            return int(first[0].shape[2])
    raise CacheAPIError(f"{describe(model)} passed a key/value cache of type "
                        f"{type(past).__name__}, which peftspec cannot read; soft prompts "
                        "need to know whether a call is a cached decoding step. Please report "
                        "this with the versions named here.")


def uses_cache_objects(model: nn.Module) -> bool:
    """Whether ``model`` takes transformers ``Cache`` objects (else legacy tuples).

    peftspec's default model takes a list of ``(key, value)`` pairs; transformers
    4.x models say ``_supports_cache_class``; 5.x models all take Cache objects
    and no longer carry the attribute.
    """
    if not type(model).__module__.startswith("transformers."):
        return False
    flag = getattr(type(model), "_supports_cache_class", None)
    return True if flag is None else bool(flag)


def new_dynamic_cache(model: nn.Module):
    """An empty ``DynamicCache`` for ``model``, built as the installed version wants."""
    try:
        from transformers import DynamicCache
    except ImportError as exc:
        raise CacheAPIError(f"{describe(model)} takes Cache objects but transformers has no "
                            "DynamicCache") from exc
    params = inspect.signature(DynamicCache.__init__).parameters
    config = getattr(model, "config", None)
    if "config" in params and config is not None:
        return DynamicCache(config=config)
    return DynamicCache()


def with_prefix(pairs: list[tuple[torch.Tensor, torch.Tensor]], cache, model: nn.Module):
    """A cache holding ``pairs`` (per layer, (batch, heads, n, head_dim) keys and values),
    of the kind ``model`` takes; ``cache``: one to fill, or None."""
    if not uses_cache_objects(model):
        if cache is not None and cache_len(cache, model):
            raise CacheAPIError(f"{describe(model)}: a prefix cannot go in front of a "
                                "non-empty legacy cache")
        if type(model).__module__.startswith("transformers."):
            return tuple(pairs)
        return list(pairs)
    if cache is None:
        cache = new_dynamic_cache(model)
    if not hasattr(cache, "update"):
        raise CacheAPIError(f"{describe(model)} passed a cache of type "
                            f"{type(cache).__name__} without update(); peftspec cannot put "
                            "prefixes in it")
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache
