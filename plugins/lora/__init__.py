"""LoRA, rsLoRA and DoRA for ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Embedding``.

The update is ``W + s·B·A`` with ``s = alpha/r`` (``alpha/sqrt(r)`` with
``rslora``). ``B`` starts at zero, so the model's outputs are unchanged at
apply. With ``dora``, a magnitude vector ``m`` (one entry per output row,
initialised to the row norms of ``W``) rescales the adapted weight:
``W' = m · (W + s·B·A) / ||W + s·B·A||``, the norm detached from the graph as
the DoRA paper recommends.

The patched module keeps the original ``weight`` and ``bias`` parameters as
the same objects under the same names, so the base model's state-dict keys do
not change; the new tensors appear beside them as ``lora_A``, ``lora_B`` and
``lora_magnitude``.

The package: :mod:`.options` (the rule's options), :mod:`.linear` (the Linear /
Conv1D module), :mod:`.dora` (DoRA's magnitude), :mod:`.embedding`,
:mod:`.method` (the method), :mod:`.init` (PiSSA / OLoRA), :mod:`.eva` and
:mod:`.eva_apply` (EVA). HF PEFT's format is the codec
``peftspec_plugins.hf_peft.lora``.
"""

from __future__ import annotations

from peftspec.plugin_api import hookimpl

from .embedding import LoRAEmbedding
from .linear import LoRALinear, kaiming_bound
from .method import LoRA
from .options import LoRAOptions

__all__ = ["LoRA", "LoRAEmbedding", "LoRALinear", "LoRAOptions", "kaiming_bound"]


@hookimpl
def register_methods(register):
    register(LoRA())
