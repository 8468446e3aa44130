"""Keeping torchao's import-time chatter off the user's terminal.

Importing torchao (which transformers does on *every* import when torchao is
installed, to probe its quantizers) logs one warning per CUDA kernel library
it cannot load on a CPU-only machine (``Failed to load …/_C_mxfp8….so``),
through the ``torchao`` logger with no handler, so Python's last-resort
handler prints them to stderr; and torch's ``torch.utils._pytree`` logger warns
that torchao registers an Enum the deprecated way. Neither is actionable for
a peftspec user. A filter on those two loggers, installed when peftspec is
imported (creating a logger imports nothing), drops exactly those records;
every other message of either logger still gets through.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

_NOISE = {
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropNoise(logging.Filter):
    """Drops records whose message starts with (or contains) a known noise text."""

    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(t in message for t in self.texts)


def install() -> None:
    """Attach the filters (idempotent)."""
    for name, texts in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(texts))


@contextmanager
def quiet_torchao():
    """For code that imports torchao itself: the filters are in place."""
    install()
    yield
