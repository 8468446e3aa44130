"""The built-in HF PEFT codecs: how each built-in method's rules read and write HF
PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``.

One module per method (``lora``, ``adalora``, ``ia3``, ``loha``, ``lokr``,
``oft``, ``vera``, ``prompts``, ``trainable_tokens``; ``lycoris`` is what LoHa
and LoKr share), each an :class:`peftspec.plugin_api.HFPeftCodec` registered
below through the ``register_hf_peft_codecs`` hook, exactly as a third party
registers a codec for its own method. The methods know nothing of HF PEFT;
these modules import the methods (their options, shape rules, tensor names),
never the other way round (import-linter holds it, ``pyproject.toml``).
"""

from __future__ import annotations

from peftspec.plugin_api import hookimpl

from .adalora import AdaLoRACodec
from .ia3 import IA3Codec
from .loha import LoHaCodec
from .lokr import LoKrCodec
from .lora import LoRACodec
from .oft import OFTCodec
from .prompts import PrefixTuningCodec, PromptTuningCodec, PTuningCodec
from .trainable_tokens import TrainableTokensCodec
from .vera import VeRACodec

CODECS = (LoRACodec, AdaLoRACodec, IA3Codec, LoHaCodec, LoKrCodec, OFTCodec, VeRACodec,
          PromptTuningCodec, PTuningCodec, PrefixTuningCodec, TrainableTokensCodec)


@hookimpl
def register_hf_peft_codecs(register):
    for codec in CODECS:
        register(codec())
