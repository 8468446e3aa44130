"""Built-in model sources for ``--model``.

* ``default`` (or no ``--model``): the small nanoGPT-shaped causal LM that
  ships with peftspec; no download.
* ``py:package.module:factory``: calls ``factory()``, which returns any
  ``torch.nn.Module``.
* ``hf:PATH``: a local transformers directory (``pip install 'peftspec[hf]'``);
  never reaches the network.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from torch import nn

from peftspec import ModelSourceError, hookimpl


def load_default(rest: str) -> nn.Module:
    from peftspec.models.nanogpt import GPT, GPTConfig

    if rest:
        raise ModelSourceError(f"the default model takes no argument, got 'default:{rest}'")
    return GPT(GPTConfig())


def load_py(rest: str) -> nn.Module:
    mod_name, sep, attr = rest.partition(":")
    if not sep or not mod_name or not attr:
        raise ModelSourceError(f"expected 'py:package.module:factory', got 'py:{rest}'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelSourceError(f"cannot import '{mod_name}' for 'py:{rest}': {exc}") from None
    factory = getattr(mod, attr, None)
    if factory is None:
        raise ModelSourceError(f"module '{mod_name}' has no attribute '{attr}'")
    model = factory
    if callable(factory) and not isinstance(factory, nn.Module):
        try:
            model = factory()
        except Exception as exc:  # noqa: BLE001 - user code; report it as bad input
            raise ModelSourceError(f"'py:{rest}' raised {exc!r}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"'py:{rest}' returned {type(model).__name__}, not a "
                               "torch.nn.Module")
    return model


def load_hf(rest: str) -> nn.Module:
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
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)),
               transformers.AutoModel)
    return cls.from_pretrained(path, local_files_only=True)


@hookimpl
def register_model_sources(register):
    register("default", load_default, "the built-in nanoGPT-shaped causal LM (no download)")
    register("py", load_py, "py:package.module:factory, any torch.nn.Module")
    register("hf", load_hf, "hf:PATH, a local transformers directory (extra 'hf')")
