"""Soft prompts: prompt tuning, P-tuning and prefix tuning (the ``[prefix]`` section).

* ``prompt-tuning`` (Lester et al. 2021): ``tokens`` trainable embeddings are
  prepended to the input embeddings.
* ``p-tuning`` (Liu et al. 2021): the virtual-token embeddings come from a
  small MLP or LSTM prompt encoder; on save the encoder's *output* is stored,
  so inference needs no encoder.
* ``prefix-tuning`` (Li & Liang 2021): ``tokens`` key/value prefixes per
  layer, optionally produced by an MLP (``projection``), handed to the model
  as its cache (transformers models) or ``past_key_values`` (the default
  model).

A forward pre-hook on the whole model rewrites its inputs: ``input_ids``
become ``inputs_embeds`` with the prompt in front, the attention mask gets
``tokens`` leading ones, labels get ``tokens`` leading -100s (so the loss
ignores the virtual tokens), ``token_type_ids`` leading zeros, and explicit
``position_ids`` are shifted so the real tokens sit after the prompt. On a
cached decoding step the prompt is already in the cache: only the mask and
positions are adjusted. So ``generate()`` works with and without the cache,
batched and left-padded. Trainable counts and tensor layouts follow HF PEFT.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import Method, context_length, hookimpl, option

from .kv_cache import CACHE_ARGS, cache_arg, cache_len, describe, with_prefix
from peftspec.plugin_api import GPT

CHILD = "prompt"


def _check_tokens_option(opts) -> None:
    if getattr(opts, "embedding", None) == "":
        raise ValueError("'embedding' must name a module, e.g. 'transformer.wte'")


@dataclass(frozen=True)
class PromptTuningOptions:
    tokens: int = option(doc="number of virtual tokens", min=1)
    init: Any = option("random", doc="'random', 'vocab' (rows of the embedding table), "
                                     "or { text = \"...\" } (its tokens' embeddings)")
    token_ids: tuple[int, ...] = option((), doc="token ids of the init text, when the "
                                              "model has no tokenizer")
    embedding: str | None = option(None, doc="the input embedding's module name "
                                             "(found automatically on transformers models)")

    def __post_init__(self):
        _check_tokens_option(self)
        init = self.init
        if isinstance(init, str):
            if init not in ("random", "vocab"):
                raise ValueError(f"init must be 'random', 'vocab' or {{ text = \"...\" }}, "
                                 f"got {init!r}")
        elif isinstance(init, dict):
            extra = set(init) - {"text"}
            if extra or not isinstance(init.get("text"), str) or not init["text"]:
                raise ValueError("init as a table takes one key: text = \"...\" "
                                 f"(got keys {sorted(init)})")
        else:
            raise ValueError(f"init must be 'random', 'vocab' or {{ text = \"...\" }}, "
                             f"got {init!r}")
        if self.token_ids and not isinstance(init, dict):
            raise ValueError("token_ids go with init = { text = \"...\" }")


@dataclass(frozen=True)
class PTuningOptions:
    tokens: int = option(doc="number of virtual tokens", min=1)
    encoder: Literal["mlp", "lstm"] = option("mlp", doc="the prompt encoder")
    encoder_hidden: int | None = option(None, doc="encoder width (default: model width)",
                                        min=1)
    embedding: str | None = option(None, doc="the input embedding's module name")

    def __post_init__(self):
        _check_tokens_option(self)


@dataclass(frozen=True)
class PrefixTuningOptions:
    tokens: int = option(doc="number of prefix positions per layer", min=1)
    projection: bool = option(False, doc="produce the prefixes with an MLP")
    projection_hidden: int | None = option(None, doc="the MLP's width (default: model "
                                                     "width)", min=1)
    embedding: str | None = option(None, doc="the input embedding's module name")

    def __post_init__(self):
        _check_tokens_option(self)


# --- finding what a soft prompt needs in a model -------------------------------------

def find_embedding(model: nn.Module, path: str | None) -> tuple[str, nn.Module]:
    if path:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"embedding '{path}' is not a module of this model") from None
    else:
        getter = getattr(model, "get_input_embeddings", None)
        module = getter() if callable(getter) else None
        if module is None:
            raise ValueError("cannot find the model's input embedding: it has no "
                             "get_input_embeddings(); name it with embedding = '...'")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"the input embedding ({type(module).__name__}) has no 2-D weight")
    name = next((n for n, m in model.named_modules() if m is module), path or "?")
    return name, module


def _forward_params(model: nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) for prefix tuning."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("prefix tuning needs a model with a config (transformers, or "
                         "peftspec's default model)")
    if hasattr(cfg, "n_layer") and hasattr(cfg, "n_head") and hasattr(cfg, "n_embd") and \
            not hasattr(cfg, "num_hidden_layers"):  # peftspec's default model
        return cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if layers is None or heads is None:
        raise ValueError(f"cannot read layers and heads from {type(cfg).__name__}")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv_heads, head_dim


# --- modules --------------------------------------------------------------------------

class PromptEncoderMLP(nn.Module):
    def __init__(self, d: int, hidden: int, out: int, like: torch.Tensor, act=nn.ReLU,
                 layers: int = 3):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        if layers == 3:  # P-tuning's encoder, as HF PEFT builds it
            self.net = nn.Sequential(nn.Linear(d, hidden, **kw), act(), nn.Linear(hidden, hidden, **kw),
                                     act(), nn.Linear(hidden, out, **kw))
        else:  # prefix tuning's projection
            self.net = nn.Sequential(nn.Linear(d, hidden, **kw), act(), nn.Linear(hidden, out, **kw))

    def forward(self, x):
        return self.net(x)


class PromptEncoderLSTM(nn.Module):
    def __init__(self, d: int, hidden: int, like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.lstm = nn.LSTM(d, hidden, num_layers=2, bidirectional=True, batch_first=True, **kw)
        self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(),
                                  nn.Linear(2 * hidden, d, **kw))

    def forward(self, x):
        return self.head(self.lstm(x.unsqueeze(0))[0]).squeeze(0)


class SoftPrompt(nn.Module):
    """The trainable table of virtual tokens (and its encoder, if any).

    ``table()`` is what the model sees: (tokens, width) for prompts, (tokens,
    layers·2·kv_width) for prefixes. Saved as ``prompt.embeddings``.
    """

    def __init__(self, table: torch.Tensor, encoder: nn.Module | None = None):
        super().__init__()
        self.embeddings = nn.Parameter(table)
        self.encoder = encoder

    @property
    def tokens(self) -> int:
        return self.embeddings.shape[0]

    def table(self) -> torch.Tensor:
        return self.embeddings if self.encoder is None else self.encoder(self.embeddings)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        if self.encoder is None:
            return {"embeddings": self.embeddings}
        with torch.no_grad():
            return {"embeddings": self.table().detach()}

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        table = tensors["embeddings"]
        if self.encoder is not None:  # the stored table is the encoder's output
            self.encoder = None
            self.embeddings = nn.Parameter(
                table.to(self.embeddings.dtype).to(self.embeddings.device).clone())
        else:
            self.embeddings.copy_(table)


# --- the input rewriting hook ------------------------------------------------------------

class _Rewriter:
    """Forward pre-hook (with kwargs) on the whole model."""

    def __init__(self, model: nn.Module, prompt: SoftPrompt, embedding: nn.Module, kind: str,
                 geometry: tuple[int, int, int] | None, rows: list | None = None):
        self.sig = _forward_params(model)
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


# --- methods ---------------------------------------------------------------------------

class _SoftPromptMethod(Method):
    family = "prefix"
    mergeable = False
    kind = "prompt"

    def _parts(self, model, options):
        _, emb = find_embedding(model, options.embedding)
        sig = _forward_params(model)
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
        _attachments(module)[id(step)] = (prompt, _Rewriter(module, prompt, emb, self.kind,
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
        rows = _Rewriter.__new__(_Rewriter)
        rows.__dict__.update(rewriter.__dict__)
        rows.rows = per_row
        return model.register_forward_pre_hook(rows, with_kwargs=True)

    def release(self, installed, original, step):
        _attachments(installed).pop(id(step), None)
        if not _attachments(installed):
            del installed.__dict__["_peftspec_prompts"]

    # --- HF PEFT's format: the stored table is HF PEFT's prompt_embeddings, row for row
    # (both store an encoder's output, not the encoder) --------------------------------
    def to_hf_peft(self, rules, ctx):
        rule = rules[0]
        table = rule.tensor(f"{CHILD}.embeddings")
        config = {"num_virtual_tokens": rule.options.tokens, "num_transformer_submodules": 1,
                  "token_dim": int(table.shape[1]), "num_layers": None,
                  "num_attention_heads": None}
        if self.kind == "prefix":  # without the model HF PEFT fills these in at load
            config["token_dim"] = None
            if ctx.model is not None:
                layers, heads, hd = kv_geometry(ctx.model)
                config.update(num_layers=layers, num_attention_heads=heads, token_dim=heads * hd)
        config.update(self._hf_options(rule.options, config, ctx))
        return ctx.part(self.hf_peft_types[0], config, {"prompt_embeddings": table})

    def from_hf_peft(self, config, ctx):
        if config.get("num_transformer_submodules") not in (1, None):
            ctx.refuse(f"cannot import: num_transformer_submodules = "
                       f"{config['num_transformer_submodules']} (an encoder-decoder prompt); "
                       f"peftspec's {self.name} has one table for decoder-only models")
        if not isinstance(config.get("num_virtual_tokens"), int):
            ctx.refuse("cannot import: adapter_config.json has no num_virtual_tokens")
        table = {"method": self.name, "tokens": config["num_virtual_tokens"],
                 **self._hf_read(config, ctx)}
        return ctx.imported([ctx.rule("prefix", table)],
                            {f"{CHILD}.embeddings": ("prompt_embeddings", None)})

    def _hf_options(self, options, config, ctx) -> dict:
        return {}

    def _hf_read(self, config, ctx) -> dict:
        return {}


def _attachments(model: nn.Module) -> dict:
    return model.__dict__.setdefault("_peftspec_prompts", {})


def _like(emb: nn.Module) -> dict:
    return {"dtype": emb.weight.dtype, "device": emb.weight.device}


class PromptTuning(_SoftPromptMethod):
    name = "prompt-tuning"
    Options = PromptTuningOptions
    summary = "trainable virtual-token embeddings prepended to the input (Lester et al.)"
    hf_peft_types = ("PROMPT_TUNING",)

    def _hf_options(self, options, config, ctx):
        if options.init == "vocab":
            return {"prompt_tuning_init": "SAMPLE_VOCAB"}
        # HF PEFT requires a tokenizer path with TEXT; the init does not affect the table
        if isinstance(options.init, dict) and ctx.base_model_name_or_path:
            return {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": options.init["text"],
                    "tokenizer_name_or_path": ctx.base_model_name_or_path}
        return {"prompt_tuning_init": "RANDOM"}

    def _hf_read(self, config, ctx):
        init = config.get("prompt_tuning_init", "RANDOM")
        text = config.get("prompt_tuning_init_text")
        if init == "SAMPLE_VOCAB":
            return {"init": "vocab"}
        if init == "TEXT" and text and _tokenizer(ctx.model) is not None:
            return {"init": {"text": text}}
        return {"init": "random"}

    def check(self, module, step):
        reason = super().check(module, step)
        if reason is None and isinstance(step.options.init, dict) and not step.options.token_ids:
            if _tokenizer(module) is None:
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
            ids = list(options.token_ids) or _tokenizer(model)(options.init["text"])
            if not ids:
                raise ValueError("the init text has no tokens")
            ids = (ids * math.ceil(n / len(ids)))[:n]
            table = F.embedding(torch.tensor(ids, device=weight.device), weight.detach()).clone()
        else:
            table = torch.randn(n, weight.shape[1], **_like(emb))
        return SoftPrompt(table)


class PTuning(_SoftPromptMethod):
    name = "p-tuning"
    Options = PTuningOptions
    summary = "virtual tokens from an MLP/LSTM prompt encoder; saved as its output"
    hf_peft_types = ("P_TUNING",)

    def _hf_options(self, options, config, ctx):
        return {"encoder_reparameterization_type": options.encoder.upper(),
                "encoder_hidden_size": options.encoder_hidden or config["token_dim"],
                "encoder_num_layers": 2, "encoder_dropout": 0.0}

    def _hf_read(self, config, ctx):
        encoder = str(config.get("encoder_reparameterization_type", "MLP")).lower()
        if encoder not in ("mlp", "lstm"):
            ctx.refuse(f"cannot import: encoder_reparameterization_type {encoder!r}")
        out = {"encoder": encoder}
        hidden = config.get("encoder_hidden_size")
        if hidden and hidden != config.get("token_dim"):
            out["encoder_hidden"] = hidden
        return out

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


class PrefixTuning(_SoftPromptMethod):
    name = "prefix-tuning"
    Options = PrefixTuningOptions
    summary = "per-layer key/value prefixes, optionally from an MLP (Li & Liang)"
    kind = "prefix"
    hf_peft_types = ("PREFIX_TUNING",)

    def _hf_options(self, options, config, ctx):
        if not options.projection:
            return {"prefix_projection": False}
        return {"prefix_projection": True,
                "encoder_hidden_size": options.projection_hidden or config["token_dim"]}

    def _hf_read(self, config, ctx):
        layers, heads, hd = kv_geometry(ctx.model)
        for key, ours in (("num_layers", layers), ("num_attention_heads", heads),
                          ("token_dim", heads * hd)):
            if config.get(key) not in (None, ours):
                ctx.refuse(f"cannot import: adapter_config.json has {key} = {config[key]}; this "
                           f"model's prefixes have {ours} ({layers} layers, {heads} key/value "
                           f"heads of width {hd})")
        if not config.get("prefix_projection"):
            return {}
        hidden = config.get("encoder_hidden_size")
        return {"projection": True, **({"projection_hidden": hidden}
                                       if hidden and hidden != heads * hd else {})}

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


def _tokenizer(model: nn.Module):
    """A text -> token ids function for the model, or None."""

    if isinstance(model, GPT):
        return lambda text: list(text.encode("utf-8"))
    path = getattr(getattr(model, "config", None), "_name_or_path", None) or \
        getattr(getattr(model, "config", None), "name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no tokenizer there
        return None
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


@hookimpl
def register_methods(register):
    register(PromptTuning())
    register(PTuning())
    register(PrefixTuning())
