"""The three soft-prompt methods: prompt tuning, P-tuning and prefix tuning."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import Method, context_length

from .kv_cache import CACHE_ARGS, cache_arg, describe
from .models import CHILD, find_embedding, kv_geometry, view_for
from .modules import PromptEncoderLSTM, PromptEncoderMLP, SoftPrompt
from .options import PrefixTuningOptions, PromptTuningOptions, PTuningOptions
from .rewriter import Rewriter


class SoftPromptMethod(Method):
    """What the three soft-prompt methods share: one table (and maybe an encoder) per
    adapter, attached to the whole model through a :class:`~.rewriter.Rewriter`."""


    family = "prefix"
    kind = "prompt"

    def _parts(self, model, options):
        _, emb = find_embedding(model, options.embedding)
        sig = inspect.signature(model.forward)
        if self.kind == "prompt" and "inputs_embeds" not in sig.parameters:
            raise ValueError(f"{self.name} needs a model whose forward() takes "
                             f"'inputs_embeds'; {describe(model)}.forward does not")
        if cache_arg(sig) is None and (self.kind == "prefix" or "use_cache" in sig.parameters):
            # prefix tuning hands the prefixes over as the cache; prompt tuning must
            # tell cached decoding steps from the first call
            raise ValueError(f"{self.name} needs to reach the key/value cache, but "
                             f"{describe(model)}.forward takes none of "
                             f"{', '.join(repr(a) for a in reversed(CACHE_ARGS))}")
        return emb

    def check(self, module, step):
        try:
            self._parts(module, step.options)
            if self.kind == "prefix":
                kv_geometry(module)
        except ValueError as exc:
            return str(exc)
        if CHILD in module._modules or hasattr(module, CHILD):
            return f"the model already has an attribute named '{CHILD}'"
        limit = context_length(module)
        if limit is not None and step.options.tokens >= limit:
            return (f"tokens = {step.options.tokens} leaves no room for input in this "
                    f"model's context of {limit} positions")
        return None

    def width(self, model, options) -> int:
        if self.kind == "prefix":
            layers, heads, hd = kv_geometry(model)
            return layers * 2 * heads * hd
        return find_embedding(model, options.embedding)[1].weight.shape[1]

    def build(self, model, options, emb) -> SoftPrompt:
        raise NotImplementedError

    def apply(self, module, step):
        emb = self._parts(module, step.options)
        prompt = self.build(module, step.options, emb)
        geometry = kv_geometry(module) if self.kind == "prefix" else None
        # One entry per adapter (several adapters may prompt one model), kept
        # outside the module registry: the rewriter must not be a submodule.
        _attachments(module)[id(step)] = (prompt, Rewriter(module, prompt, emb, self.kind,
                                                            geometry))
        self.attach(module, module, step)
        return module

    def attach(self, installed, original, step):
        prompt, rewriter = _attachments(installed)[id(step)]
        setattr(installed, CHILD, prompt)
        prompt.__dict__["_handle"] = installed.register_forward_pre_hook(rewriter,
                                                                         with_kwargs=True)

    def detach(self, installed, original, step):
        prompt, _ = _attachments(installed)[id(step)]
        prompt.__dict__.pop("_handle").remove()
        delattr(installed, CHILD)


    def rows_attach(self, model, steps, names):
        if self.kind != "prompt":
            raise NotImplementedError(f"{self.name} does not support per-row adapters")
        entries = {n: _attachments(model)[id(step)] for n, step in steps.items()}
        counts = {prompt.tokens for prompt, _ in entries.values()}
        if len(counts) != 1:
            raise NotImplementedError("per-row soft prompts need the same number of tokens "
                                      f"in every adapter, got {sorted(counts)}")
        prompt, rewriter = next(iter(entries.values()))
        per_row = [entries[n][0] if n in entries else None for n in names]
        rows = Rewriter.__new__(Rewriter)
        rows.__dict__.update(rewriter.__dict__)
        rows.rows = per_row
        return model.register_forward_pre_hook(rows, with_kwargs=True)

    def release(self, installed, original, step):
        _attachments(installed).pop(id(step), None)
        if not _attachments(installed):
            del installed.__dict__["_peftspec_prompts"]


def _attachments(model: nn.Module) -> dict:
    return model.__dict__.setdefault("_peftspec_prompts", {})


def _like(emb: nn.Module) -> dict:
    return {"dtype": emb.weight.dtype, "device": emb.weight.device}


class PromptTuning(SoftPromptMethod):
    name = "prompt-tuning"
    Options = PromptTuningOptions
    summary = "trainable virtual-token embeddings prepended to the input (Lester et al.)"

    def check(self, module, step):
        reason = super().check(module, step)
        if reason is None and isinstance(step.options.init, dict) and not step.options.token_ids:
            if view_for(module).tokenizer() is None:
                return ("init = { text = ... } needs a tokenizer: this model has none (an "
                        "hf: directory's, or the default model's bytes); give token_ids")
        return reason

    def count_params(self, module, step):
        return step.options.tokens * self.width(module, step.options)

    def build(self, model, options, emb) -> SoftPrompt:
        n, weight = options.tokens, emb.weight
        if options.init == "vocab":
            idx = torch.randint(0, weight.shape[0], (n,), device=weight.device)
            table = F.embedding(idx, weight.detach()).clone()  # also on a [[freeze]] bf16/int8 table
        elif isinstance(options.init, dict):
            ids = list(options.token_ids) or view_for(model).tokenizer()(options.init["text"])
            if not ids:
                raise ValueError("the init text has no tokens")
            ids = (ids * math.ceil(n / len(ids)))[:n]
            table = F.embedding(torch.tensor(ids, device=weight.device), weight.detach()).clone()
        else:
            table = torch.randn(n, weight.shape[1], **_like(emb))
        return SoftPrompt(table)


class PTuning(SoftPromptMethod):
    name = "p-tuning"
    Options = PTuningOptions
    summary = "virtual tokens from an MLP/LSTM prompt encoder; saved as its output"

    def count_params(self, module, step):
        d = self.width(module, step.options)
        h = step.options.encoder_hidden or d
        n = step.options.tokens * d
        if step.options.encoder == "mlp":
            return n + (d * h + h) + (h * h + h) + (h * d + d)
        lstm = 4 * h * (d + h + 2) * 2 + 4 * h * (2 * h + h + 2) * 2
        return n + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)

    def build(self, model, options, emb) -> SoftPrompt:
        d = emb.weight.shape[1]
        h = options.encoder_hidden or d
        like = emb.weight
        enc = PromptEncoderMLP(d, h, d, like) if options.encoder == "mlp" else \
            PromptEncoderLSTM(d, h, like)
        return SoftPrompt(torch.randn(options.tokens, d, **_like(emb)), enc)


class PrefixTuning(SoftPromptMethod):
    name = "prefix-tuning"
    Options = PrefixTuningOptions
    summary = "per-layer key/value prefixes, optionally from an MLP (Li & Liang)"
    kind = "prefix"

    def count_params(self, module, step):
        width = self.width(module, step.options)
        n = step.options.tokens
        if not step.options.projection:
            return n * width
        d = width // (2 * kv_geometry(module)[0])  # one layer's key width, as HF PEFT
        h = step.options.projection_hidden or d
        return n * d + (d * h + h) + (h * width + width)

    def build(self, model, options, emb) -> SoftPrompt:
        width = self.width(model, options)
        n = options.tokens
        if not options.projection:
            return SoftPrompt(torch.randn(n, width, **_like(emb)))
        d = width // (2 * kv_geometry(model)[0])  # one layer's key width, as HF PEFT
        h = options.projection_hidden or d
        enc = PromptEncoderMLP(d, h, width, emb.weight, act=nn.Tanh, layers=2)
        return SoftPrompt(torch.randn(n, d, **_like(emb)), enc)
