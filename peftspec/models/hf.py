"""Local transformers directories (``--model hf:PATH``): the config and the class
to build it with. Shared by the ``hf`` model source (which loads the weights)
and the streamed ``peftspec merge`` (which builds the model on the meta device)."""

from __future__ import annotations

import os
from pathlib import Path

from peftspec.core.errors import ModelSourceError
from peftspec.models.gguf import folder_for, smollm2_file


def config_and_class(rest: str):
    """``(path, config, cls)`` for ``hf:rest``: its ``AutoConfig`` (read offline) and
    the transformers class its ``architectures`` names.

    A config without ``architectures`` (a hand-converted folder) gets
    ``AutoModelForCausalLM`` when its model type is a decoder-only family (one
    transformers has a causal-LM class for and no masked-LM class: Llama,
    GPT-2, Qwen, ...), else ``AutoModel``. Every command must build the same
    class from one folder, or an adapter trained by ``train`` would not fit
    the model ``plan`` or ``merge`` sees; and a bare ``LlamaModel`` computes
    no loss and cannot generate, which is all such a folder is used for.
    Encoders (BERT) keep ``AutoModel``, as before.

    Raises:
        ModelSourceError: not a directory with a ``config.json``, or no transformers.
    """
    path = Path(rest)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"'hf:{rest}' is not a local transformers directory "
                               "(no config.json there); peftspec never downloads models")
    try:
        import transformers
    except ImportError:
        raise ModelSourceError("hf: models need transformers: pip install 'peftspec[hf]'") \
            from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        cls = transformers.AutoModelForCausalLM if is_decoder_only(config) \
            else transformers.AutoModel
    return path, config, cls


def is_decoder_only(config) -> bool:
    """Whether transformers has a causal-LM class for this config's model type
    and no masked-LM one (BERT has both: it is an encoder)."""
    from transformers.models.auto import modeling_auto as auto

    kind = getattr(config, "model_type", None)
    return kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
        kind not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES


def hf_folder(source: str | None) -> Path | None:
    """The local transformers folder a model source reads, or None when it has
    none (the built-in model, ``py:``): ``hf:PATH`` is PATH; ``gguf:PATH`` and
    ``smollm2`` are their converted cache folders (converted first if need be).

    The tokenizer (training, ``generate``) and the streamed merge read it."""
    if not source:
        return None
    prefix, _, rest = source.partition(":")
    if prefix == "hf":
        return Path(rest)
    if prefix == "gguf":

        return folder_for(rest, spelled=source)
    if source == "smollm2":

        return folder_for(smollm2_file(), spelled=source)
    return None
