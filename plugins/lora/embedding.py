"""LoRA beside a frozen ``nn.Embedding``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .options import LoRAOptions


class LoRAEmbedding(nn.Module):
    """LoRA beside a frozen ``nn.Embedding``: ``E + s·(B·A)ᵀ`` looked up by index."""

    def __init__(self, base: nn.Embedding, opts: LoRAOptions):
        super().__init__()
        self.weight = base.weight
        self.num_embeddings, self.embedding_dim = base.weight.shape
        for attr in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(base, attr))
        w = base.weight
        self.r = opts.r
        self.scale = opts.scale
        self.dropout = opts.dropout
        # As HF PEFT: A (r, num) starts at zero, B (dim, r) Gaussian; the update is zero.
        self.lora_A = nn.Parameter(torch.zeros(opts.r, self.num_embeddings, dtype=w.dtype,
                                               device=w.device))
        self.lora_B = nn.Parameter(torch.empty(self.embedding_dim, opts.r, dtype=w.dtype,
                                               device=w.device))
        with torch.no_grad():
            nn.init.normal_(self.lora_B)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def param_roles(self) -> dict[str, str]:
        """LoRA+ gives embedding LoRA its own learning rate (``loraplus_lr_embedding``)."""
        return {"lora_A": "embedding", "lora_B": "embedding"}

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x, self._lookup(x, self.weight))

    def adapt(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The adapted output, given the base lookup ``out`` for ``x``."""
        after_a = self._lookup(x, self.lora_A.t())
        return out + (after_a @ self.lora_B.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B.float() @ self.lora_A.float()).t() * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"embedding, num={self.num_embeddings}, dim={self.embedding_dim}, r={self.r}, "
                f"scale={self.scale:g}")
