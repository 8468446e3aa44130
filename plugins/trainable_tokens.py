"""Trainable tokens: train chosen rows of an embedding (new special tokens), nothing else.

The adapted ``nn.Embedding`` looks its ids up in ``E`` with rows
``token_indices`` replaced by the trainable ``trainable_tokens_delta`` (one row
per index, initialised to those rows of ``E``, so outputs are unchanged at
apply), as HF PEFT's ``TrainableTokensLayer`` does: the adapter stores those
rows only, never the table. ``E`` itself stays untouched.

Where an output head shares the embedding's weight (GPT-2, the built-in
model: tied embeddings), HF PEFT makes the head use the same new rows; so does
this method: :meth:`TrainableTokens.resolve_options` finds the tied ``Linear``
heads and adds them as ``tied_heads`` targets, whose modules read the
embedding module's rows (one parameter, counted and stored once). Beside LoRA
it is its own rule (``[[reparameterize]] method = "trainable-tokens"``), and
HF PEFT's format holds the pair as one LoRA adapter
(``LoraConfig(trainable_token_indices=...)``, :meth:`TrainableTokens.to_hf_peft_beside`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.plugin_api import Method, Problem, hookimpl, option, selectors
from peftspec.plugin_api import is_packed
from peftspec.plugin_api import parse_selector


@dataclass(frozen=True)
class TrainableTokensOptions:
    modules: tuple[str, ...] = selectors(doc="the embedding(s) whose rows to train")
    token_indices: tuple[int, ...] = option((), doc="the rows (token ids) to train")
    tied_heads: tuple[str, ...] = selectors(
        required=False, doc="Linear heads sharing the embedding's weight (found by itself)")


FROZEN_TABLE = ("its weight is {codec}-frozen ([[freeze]]); trainable tokens write rows of "
                "the table: exclude this embedding from the freeze rule")


class TokenRows(nn.Module):
    """An ``nn.Embedding`` whose rows ``token_indices`` come from ``trainable_tokens_delta``."""

    def __init__(self, base: nn.Embedding, indices: tuple[int, ...]):
        super().__init__()
        self.weight = base.weight
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm",
                     "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(base, attr))
        # a plain tensor, not a buffer: the base's named tensors (its fingerprint) stay
        self.__dict__["token_indices"] = torch.tensor(indices, dtype=torch.long,
                                                      device=base.weight.device)
        self.trainable_tokens_delta = nn.Parameter(
            base.weight.detach()[self.token_indices].clone())

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"trainable_tokens_delta": self.trainable_tokens_delta}

    def table(self) -> torch.Tensor:
        """The embedding with the trained rows in place (a new tensor; ``E`` untouched)."""
        if self.token_indices.device != self.weight.device:  # the model moved
            self.__dict__["token_indices"] = self.token_indices.to(self.weight.device)
        return self.weight.index_copy(0, self.token_indices,
                                      self.trainable_tokens_delta.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.table(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tokens={len(self.token_indices)}"


class TiedHead(nn.Module):
    """A ``Linear`` head tied to a :class:`TokenRows` embedding: it uses the same rows.

    It holds the embedding module outside its children (no second copy of the
    parameter in ``named_parameters`` or in the adapter file)."""

    def __init__(self, base: nn.Linear, rows: TokenRows):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.__dict__["rows"] = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rows.table(), self.bias)


class TrainableTokens(Method):
    name = "trainable-tokens"
    family = "reparameterize"
    Options = TrainableTokensOptions
    summary = "train chosen rows of an embedding (new tokens); stores those rows only"
    mergeable = True
    unchanged_at_apply = True  # the rows start as the embedding's own
    example = ('[[reparameterize]]\nmethod = "trainable-tokens"\nmodules = ["tok_emb"]\n'
               'token_indices = [0, 1]')

    def __init__(self):
        self._rows: dict[int, TokenRows] = {}  # id(weight) -> its TokenRows, for tied heads

    def resolve_options(self, options, model):
        if not options.token_indices:
            raise ValueError("token_indices is empty: list the token ids to train")
        if len(set(options.token_indices)) != len(options.token_indices):
            raise ValueError("token_indices lists a token twice")
        if options.tied_heads:
            return options
        sels = [parse_selector(s) for s in options.modules]
        mods = dict(model.named_modules())
        weights = {id(m.weight) for n, m in mods.items()
                   if isinstance(m, nn.Embedding) and any(s.matches(n) for s in sels)}
        heads = tuple(n for n, m in mods.items() if isinstance(m, nn.Linear)
                      and id(m.weight) in weights)
        return replace(options, tied_heads=heads) if heads else options

    def check(self, module, step):
        if "tied_heads" in step.roles:
            return None if isinstance(module, nn.Linear) else "a tied head must be a Linear"
        if not isinstance(module, nn.Embedding):
            return "trainable tokens adapt nn.Embedding modules only"
        if is_packed(module.weight):
            return FROZEN_TABLE.format(codec=module.weight.codec.name)
        bad = [i for i in step.options.token_indices if not 0 <= i < module.num_embeddings]
        if bad:
            return (f"token index {bad[0]} is outside this embedding's "
                    f"{module.num_embeddings} rows")
        return None

    def count_params(self, module, step):
        if "tied_heads" in step.roles:
            return 0  # the embedding's rows, counted there
        return len(step.options.token_indices) * module.embedding_dim

    def apply(self, module, step):
        if "tied_heads" in step.roles:
            rows = self._rows.get(id(module.weight))
            if rows is None or rows.weight is not module.weight:  # (an id reused: stale)
                raise ValueError(f"the tied head '{step.target}' comes before its embedding")
            return TiedHead(module, rows)
        rows = TokenRows(module, step.options.token_indices)
        self._rows[id(module.weight)] = rows
        return rows

    def release(self, installed, original, step):
        if self._rows.get(id(original.weight)) is installed:
            del self._rows[id(original.weight)]

    def merge(self, installed, original):
        if isinstance(installed, TokenRows):
            with torch.no_grad():
                original.weight.index_copy_(0, installed.token_indices.to(original.weight.device),
                                            installed.trainable_tokens_delta.to(
                                                original.weight.dtype))
        return original

    # --- HF PEFT's format: TrainableTokensConfig --------------------------------------
    hf_peft_types = ("TRAINABLE_TOKENS",)

    def to_hf_peft(self, rules, ctx):
        indices = {tuple(r.options.token_indices) for r in rules}
        if len(indices) > 1:
            ctx.refuse("cannot export: trainable-tokens rules differ in token_indices; HF "
                       "PEFT's TrainableTokensConfig has one list")
        tensors, embeddings = {}, []
        for rule in rules:
            delta = None
            for target in rule.targets:
                if target in rule.options.tied_heads:
                    continue
                embeddings.append(target)
                delta = rule.tensor(f"{target}.trainable_tokens_delta")
                tensors[ctx.key(f"{target}.trainable_tokens_delta")] = delta
            for head in rule.options.tied_heads:  # HF PEFT saves the tied copy too
                tensors[ctx.key(f"{head}.trainable_tokens_delta")] = delta
        config = {"token_indices": list(indices.pop()),
                  "target_modules": ctx.target_modules(embeddings), "init_weights": True}
        return ctx.part("TRAINABLE_TOKENS", config, tensors)

    def from_hf_peft(self, config, ctx):
        indices = ctx.get("token_indices", "int-list", [])
        if not indices:
            ctx.refuse("cannot import: token_indices is empty")
        if config.get("target_modules") is None:
            get = getattr(ctx.model, "get_input_embeddings", None)
            emb = get() if callable(get) else None
            targets = [n for n, m in ctx.modules.items() if m is emb]
        else:
            targets = [t for t in ctx.targets() if isinstance(ctx.modules[t], nn.Embedding)]
        if not targets:
            ctx.refuse("cannot import: no embedding of this model matches target_modules "
                       f"{config.get('target_modules')!r}")
        modules, exclude = ctx.selectors(targets, ctx.base_candidates())
        table = {"method": "trainable-tokens", "modules": modules}
        if exclude:
            table["exclude"] = exclude
        table["token_indices"] = indices
        tensors = {f"{t}.trainable_tokens_delta": (ctx.key(f"{t}.trainable_tokens_delta"), None)
                   for t in targets}
        weights = {id(ctx.modules[t].weight): t for t in targets}
        for name, m in ctx.modules.items():  # HF PEFT's copies for tied heads: checked, dropped
            key = ctx.key(f"{name}.trainable_tokens_delta")
            if isinstance(m, nn.Linear) and id(m.weight) in weights and key in ctx.shapes:
                ctx.drop(key, equal_to=ctx.key(f"{weights[id(m.weight)]}.trainable_tokens_delta"))
        return ctx.imported([ctx.rule("reparameterize", table)], tensors)

    # --- beside LoRA: LoraConfig(trainable_token_indices=...) ---------------------------
    # HF PEFT keeps these rows in a TrainableTokensWrapper (tensor
    # ``<embedding>.token_adapter.trainable_tokens_delta``) and ties the head to
    # the input embedding itself, saving nothing for it.
    hf_peft_beside_types = ("LORA",)
    hf_peft_beside_keys = ("trainable_token_indices",)
    _BESIDE = "token_adapter.trainable_tokens_delta"

    @staticmethod
    def _input_embedding(model, modules) -> str | None:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        return next((n for n, m in modules.items() if emb is not None and m is emb), None)

    def to_hf_peft_beside(self, rules, ctx, main):
        indices, tensors = {}, {}
        for rule in rules:
            for target in rule.targets:
                if target in rule.options.tied_heads:
                    continue
                indices[target] = list(rule.options.token_indices)
                tensors[ctx.key(f"{target}.{self._BESIDE}")] = \
                    rule.tensor(f"{target}.trainable_tokens_delta")
        emb = None if ctx.model is None else \
            self._input_embedding(ctx.model, dict(ctx.model.named_modules()))
        if emb is not None and list(indices) == [emb]:
            value = indices[emb]  # the list form: HF PEFT targets the input embedding
        else:  # the dict form: HF PEFT picks modules whose name ends with the key
            for target in indices:
                clash = [n for n in ctx.module_names if n != target and n.endswith(target)]
                if clash:
                    ctx.refuse(f"cannot export: trainable_token_indices key '{target}' would "
                               f"also pick '{clash[0]}' under HF PEFT's suffix rule")
            value = indices
        return ctx.part(main.peft_type, {"trainable_token_indices": value}, tensors)

    def from_hf_peft_beside(self, config, ctx):
        value = ctx.get("trainable_token_indices", "int-list|int-list-dict")
        if isinstance(value, list):
            emb = self._input_embedding(ctx.model, ctx.modules)
            if emb is None:  # HF PEFT's fallback name
                emb = next((n for n in ctx.modules if n.endswith("embed_tokens")), None)
            if emb is None:
                ctx.refuse("cannot import: trainable_token_indices is a list, but this model "
                           "has no input embedding (get_input_embeddings) to put them on")
            targets = {emb: value}
        else:
            targets = {}
            for key, idx in value.items():
                hits = [n for n in ctx.modules if n.endswith(key)]
                if not hits:
                    ctx.refuse(f"cannot import: trainable_token_indices key '{key}' names no "
                               "module of this model")
                targets.update(dict.fromkeys(hits, idx))
        groups: dict[tuple[int, ...], list[str]] = {}
        for name, idx in targets.items():
            if not idx:
                ctx.refuse(f"cannot import: trainable_token_indices for '{name}' is empty")
            groups.setdefault(tuple(idx), []).append(name)
        rules, tensors = [], {}
        for idx, names in groups.items():
            modules, _ = ctx.selectors(names, allow_exclude=False)
            rules.append(ctx.rule("reparameterize", {
                "method": "trainable-tokens", "modules": modules, "token_indices": list(idx)},
                "HF PEFT's trainable_token_indices, beside LoRA"))
        weights = {id(ctx.modules[t].weight): t for t in targets
                   if getattr(ctx.modules[t], "weight", None) is not None}
        for name in targets:
            tensors[f"{name}.trainable_tokens_delta"] = (ctx.key(f"{name}.{self._BESIDE}"), None)
        for name, m in ctx.modules.items():  # a tied head's copy, if a writer saved one
            if isinstance(m, nn.Linear) and id(m.weight) in weights and name not in targets:
                ctx.drop(ctx.key(f"{name}.{self._BESIDE}"),
                         equal_to=ctx.key(f"{weights[id(m.weight)]}.{self._BESIDE}"))
        return ctx.imported(rules, tensors)


@hookimpl
def register_methods(register):
    register(TrainableTokens())


@hookimpl
def check_plan(plan):
    """An embedding frozen by the same spec's ``[[freeze]]`` rule (int8 or bf16
    store tables) cannot take trainable tokens, which write its rows."""
    return [Problem(f"method 'trainable-tokens' cannot apply to '{s.target}': "
                    + FROZEN_TABLE.format(codec=next(f.method for f in plan.steps
                                                     if f.family == "freeze" and
                                                     f.target == s.target)),
                    file=plan.spec.file, line=s.line, key=s.rule)
            for s in plan.steps
            if s.method == TrainableTokens.name and "tied_heads" not in s.roles
            and s.target in plan.frozen]
