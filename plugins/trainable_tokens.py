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
(``LoraConfig(trainable_token_indices=...)``; the codec is
``peftspec_plugins.hf_peft.trainable_tokens``).
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
