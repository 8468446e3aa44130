"""Small random models for property tests: embeddings, nested blocks, norms, a head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ToyConfig:
    vocab: int = 11
    d: int = 8
    hidden: int = 12
    n_blocks: int = 2
    bias: bool = True
    tied: bool = False
    seed: int = 0


class ToyBlock(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.d)
        self.attn = nn.ModuleDict({"q": nn.Linear(c.d, c.d, bias=c.bias),
                                   "o": nn.Linear(c.d, c.d, bias=c.bias)})
        self.mlp = nn.Sequential(nn.Linear(c.d, c.hidden, bias=c.bias), nn.GELU(),
                                 nn.Linear(c.hidden, c.d, bias=c.bias))

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn["o"](torch.tanh(self.attn["q"](h)))
        return x + self.mlp(h)


class ToyNet(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        torch.manual_seed(c.seed)
        self.emb = nn.Embedding(c.vocab, c.d)
        self.blocks = nn.ModuleList(ToyBlock(c) for _ in range(c.n_blocks))
        self.head = nn.Linear(c.d, c.vocab, bias=False)
        if c.tied:
            self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(1.0))

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        for b in self.blocks:
            x = b(x)
        return self.head(x) * self.scale


# module selectors a random spec may use, with whether each names an Embedding
MODULE_SELECTORS = {"**.attn.q": False, "**.attn.o": False, "**.mlp.0": False,
                    "**.mlp.2": False, "head": False, "emb": True, "type:Linear": False}
PARAM_SELECTORS = ["**.bias", "type:LayerNorm", "blocks.0.**", "emb.weight"]
