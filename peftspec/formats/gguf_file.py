"""A minimal GGUF (version 3) writer: string/float/int metadata and F32/F16 tensors.

llama.cpp's LoRA adapters are GGUF files. peftspec writes the format itself
rather than depending on the ``gguf`` package at export time (as
:mod:`peftspec.core.safetensors_io` does for safetensors): the container is small
and fixed, and the tests read every file back with the reference reader
(``gguf.GGUFReader``), so the writer is checked against an implementation it
shares no code with.

The layout, all little-endian:

* ``b"GGUF"``, version ``uint32`` 3, tensor count ``uint64``, metadata count ``uint64``;
* each metadata entry: key (``uint64`` length + UTF-8), value type ``uint32``, value;
* each tensor's info: name, ``uint32`` number of dimensions, the dimensions as
  ``uint64`` **innermost first** (ggml's ``ne``: the reverse of the numpy/torch
  shape), ggml type ``uint32``, ``uint64`` offset into the data section;
* zero padding to the alignment (32), then each tensor's bytes, each padded to 32.
"""

from __future__ import annotations

import struct
from typing import Union

import torch

ALIGNMENT = 32
VERSION = 3

# GGUF metadata value types (gguf-py's GGUFValueType)
UINT32, INT32, FLOAT32, BOOL, STRING = 4, 5, 6, 7, 8
# ggml tensor types (gguf-py's GGMLQuantizationType)
GGML_TYPES = {torch.float32: 0, torch.float16: 1}

Value = Union[str, float, int, bool]


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(value: Value) -> bytes:
    """Type tag and payload: str -> STRING, bool -> BOOL, int -> UINT32 (INT32 when
    negative), float -> FLOAT32 (what llama.cpp reads ``adapter.lora.alpha`` as)."""
    if isinstance(value, bool):
        return struct.pack("<IB", BOOL, int(value))
    if isinstance(value, str):
        return struct.pack("<I", STRING) + _string(value)
    if isinstance(value, int):
        return struct.pack("<Ii", INT32, value) if value < 0 else struct.pack("<II", UINT32, value)
    if isinstance(value, float):
        return struct.pack("<If", FLOAT32, value)
    raise TypeError(f"GGUF metadata value of unsupported type {type(value).__name__}")


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def gguf_bytes(metadata: dict[str, Value], tensors: dict[str, torch.Tensor]) -> bytes:
    """The GGUF file holding ``metadata`` (in order) and ``tensors`` (in order,
    float32 or float16, any shape; stored row-major as torch holds them)."""
    header = [b"GGUF", struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        header += [_string(key), _value(value)]
    blobs, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in GGML_TYPES:
            raise TypeError(f"tensor '{name}': GGUF export writes float32 or float16, "
                            f"not {t.dtype}")
        arr = t.detach().to("cpu").contiguous().numpy()
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        dims = tuple(reversed(t.shape))
        header += [_string(name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims),
                   struct.pack("<IQ", GGML_TYPES[t.dtype], offset)]
        blobs.append(raw + b"\0" * _pad(len(raw)))
        offset += len(blobs[-1])
    head = b"".join(header)
    return head + b"\0" * _pad(len(head)) + b"".join(blobs)
