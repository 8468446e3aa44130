"""The options of the three soft-prompt methods (the ``[prefix]`` section)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from peftspec.plugin_api import option


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
