"""HF PEFT's adapter folder: its file names and reading it safely.

An HF PEFT adapter is a folder holding ``adapter_config.json`` and
``adapter_model.safetensors``, its tensors keyed ``base_model.model.<path>``.
This module names those files (:data:`CONFIG_FILE`, :data:`WEIGHTS_FILE`,
:data:`PREFIX`, the task types HF PEFT knows), reads a folder's config and
checks it is one (:func:`read_hf_adapter`), and reads safetensors files
(never a pickle: peftspec does not unpickle). It also holds ``refuse``, the
one way every step of a conversion fails (a :class:`ConversionError`), so
that the export and import sides share it without depending on each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError, safe_open

from peftspec.core.errors import ConversionError
from peftspec.core.untrusted import BadText, json_loads

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")


def refuse(message: str) -> NoReturn:
    """Raise the :class:`ConversionError` every HF PEFT conversion step reports with."""
    raise ConversionError(message)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``; an unreadable file is a
    :class:`ConversionError` naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from None


def read_hf_adapter(src: str | Path) -> tuple[dict, Path]:
    """``adapter_config.json`` of an HF PEFT folder, checked, and its weights' path."""
    src = Path(src)
    if not src.is_dir():
        refuse(f"{src}: not a folder; an HF PEFT adapter is a folder with {CONFIG_FILE} "
                f"and {WEIGHTS_FILE}")
    cfg_path, weights = src / CONFIG_FILE, src / WEIGHTS_FILE
    if not cfg_path.is_file():
        refuse(f"{src}: no {CONFIG_FILE} here, so this is not an HF PEFT adapter folder")
    try:
        config = json_loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, BadText) as exc:
        refuse(f"{cfg_path}: not readable JSON ({exc})")
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        refuse(f"{cfg_path}: has no 'peft_type' string; not an HF PEFT adapter config")
    if not weights.is_file():
        pickles = [p for p in PICKLES if (src / p).is_file()]
        if pickles:
            refuse(f"{src}: has only {pickles[0]}, a pickle; peftspec never unpickles (it can "
                    "run code). Re-save it as safetensors where you trust it: "
                    "PeftModel.from_pretrained(base, DIR).save_pretrained(DIR2, "
                    "safe_serialization=True)")
        refuse(f"{src}: no {WEIGHTS_FILE} here")
    return config, weights
