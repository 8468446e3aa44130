"""The optimizer's parameter groups: weight decay, and LoRA+'s learning rates.

Plain training has two groups: tensors of two or more dimensions with
``weight_decay``, the rest without. With ``loraplus_lr_ratio`` (LoRA+,
Hayou et al. 2024) the groups are split by learning rate as HF PEFT's
``create_loraplus_optimizer`` splits them:

* LoRA on an embedding: ``loraplus_lr_embedding``;
* LoRA's ``B`` factors, and every 1-D trainable tensor (HF PEFT's rule: its
  biases and DoRA magnitudes land there too): ``lr × loraplus_lr_ratio``;
* everything else (``A``, ...): ``lr``.

Which tensor is a ``B`` factor is the adapter module's to say, never guessed
from names: a module may define ``param_roles()`` mapping names (as in
``adapter_params()``) to ``"B"`` or ``"embedding"`` (see
:class:`peftspec.AdapterModule`). Each group carries ``lr_scale``, its learning
rate over ``lr``, so the schedule scales every group alike (as a LambdaLR
does for HF's optimizer).
"""

from __future__ import annotations

import torch
from torch import nn

from peftspec.core.method import adapter_modules


def param_roles(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> role`` for the tensors adapter modules give a role."""
    out: dict[int, str] = {}
    for _, module in adapter_modules(model):
        fn = getattr(module, "param_roles", None)
        if not callable(fn):
            continue
        params = module.adapter_params()
        for name, role in fn().items():
            if name in params:
                out[id(params[name])] = role
    return out


def param_groups(model: nn.Module, params: dict[str, nn.Parameter], cfg) -> list[dict]:
    """AdamW's groups for ``params`` (name -> trainable parameter), in a fixed order
    (a checkpoint's optimizer state is matched group by group)."""
    ratio = cfg.loraplus_lr_ratio
    roles = param_roles(model) if ratio else {}
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
    for p in params.values():
        scale = 1.0
        if ratio:
            role = roles.get(id(p))
            if role == "embedding":
                scale = cfg.loraplus_lr_embedding / cfg.lr if cfg.lr else 0.0
            elif role == "B" or p.dim() == 1:
                scale = ratio
        groups.setdefault((scale, p.dim() < 2), []).append(p)
    # plain training: [decay, no decay], as before LoRA+ existed (checkpoints match)
    return [{"params": groups[key], "weight_decay": 0.0 if key[1] else cfg.weight_decay,
             "lr": cfg.lr * key[0], "lr_scale": key[0]} for key in sorted(groups)]
