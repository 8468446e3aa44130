"""A deterministic safetensors writer.

The ``safetensors`` library writes its metadata from a hash map, so the same
tensors saved twice can differ byte for byte. Adapter files should be
reproducible (same seed, same bytes), so peftspec writes the format itself:
an 8-byte little-endian header length, a JSON header with keys in sorted
order (padded with spaces to a multiple of 8), then the raw little-endian
tensor data (read straight from the tensor's memory: numpy is not a
dependency). Reading stays with the ``safetensors`` library, which validates
headers, offsets and sizes.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from typing import Iterable, Iterator, Sequence

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """``t``'s bytes as safetensors stores them: contiguous, on the CPU, in its own dtype."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    # the memory itself, copied once (no numpy: the core does not require it)
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


ITEMSIZE = {name: dtype.itemsize for dtype, name in DTYPES.items()}


def header_bytes(entries: Iterable[tuple[str, str, Sequence[int]]],
                 metadata: dict[str, str] | None = None) -> bytes:
    """The header (length prefix included) of a file holding tensors
    ``(name, safetensors dtype such as "F32", shape)``, their data in this order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name, dtype, shape in entries:
        size = ITEMSIZE[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def header_and_chunks(tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> tuple[bytes, Iterator[bytes]]:
    """The file's header bytes, and an iterator over each tensor's bytes in order."""
    names = sorted(tensors)
    for name in names:
        if tensors[name].dtype not in DTYPES:
            raise TypeError(f"cannot store tensor '{name}' of dtype {tensors[name].dtype} "
                            "in safetensors")
    head = header_bytes(((n, DTYPES[tensors[n].dtype], tuple(tensors[n].shape)) for n in names),
                        metadata)
    return head, (tensor_bytes(tensors[n]) for n in names)


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The whole file as bytes (for small files such as adapters)."""
    head, chunks = header_and_chunks(tensors, metadata)
    return head + b"".join(chunks)


def write_chunks(f, head: bytes, chunks: Iterable[bytes]) -> None:
    f.write(head)
    for chunk in chunks:
        f.write(chunk)
