"""The options of a ``method = "lora"`` rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from peftspec.plugin_api import option, selectors


@dataclass(frozen=True)
class LoRAOptions:
    modules: tuple[str, ...] = selectors(doc="modules to adapt: Linear, Conv1D or Embedding")
    r: int = option(8, doc="rank of the update", min=1)
    alpha: float = option(8.0, doc="scale numerator: s = alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = option(0.0, doc="dropout on the adapter's input", min=0.0, max=0.999)
    rslora: bool = option(False, doc="rank-stabilised scaling alpha/sqrt(r)")
    dora: bool = option(False, doc="weight-decomposed LoRA: learn a per-row magnitude")
    init: Literal["zeros", "gaussian", "pissa", "olora", "eva"] = option(
        "zeros", doc="B = 0 with A Kaiming-uniform ('zeros') or A ~ N(0, 1/r) ('gaussian'); "
                     "'pissa' / 'olora' start from the weight's SVD / QR and rewrite the base "
                     "weight to the residual (plugins/lora/init.py); 'eva': A from the SVD of "
                     "each layer's inputs over the training data, computed before the first "
                     "step (plugins/lora/eva.py)")
    niter: int = option(0, doc="PiSSA: 0 for the exact SVD, N > 0 for torch.svd_lowrank with "
                               "N subspace iterations (HF PEFT's pissa_niter_N)", min=0)
    eva_rho: float = option(2.0, doc="EVA: a layer may get up to round(r*rho) of the rules' "
                                     "rank budget (1.0: every layer keeps r)", min=1.0)
    eva_tau: float = option(0.99, doc="EVA: the cosine similarity of a layer's components "
                                      "between passes at which it has converged",
                            min=0.0, max=1.0)
    eva_whiten: bool = option(False, doc="EVA: divide A's rows by sqrt of their singular value")
    eva_adjust_scaling: bool = option(True, doc="EVA: scale alpha by new_r/r where the rank "
                                                "moved (HF PEFT's adjust_scaling_factors)")
    eva_label_mask: bool = option(True, doc="EVA: skip positions whose label is -100")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
