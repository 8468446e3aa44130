"""Local transformers directories (``--model hf:PATH``): the config and the class
to build it with. Shared by the ``hf`` model source (which loads the weights)
and the streamed ``peftspec merge`` (which builds the model on the meta device)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelSourceError


def config_and_class(rest: str):
    """``(path, config, cls)`` for ``hf:rest``: its ``AutoConfig`` (read offline) and
    the transformers class its ``architectures`` names (``AutoModel`` if none).

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
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)),
               transformers.AutoModel)
    return path, config, cls
