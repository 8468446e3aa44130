"""A base model's identity: the names, shapes and dtypes of its tensors.

Saved (compressed) with every adapter, so loading onto the wrong base is an
error that says *what* differs (a missing layer, another width) instead of a
shape error deep inside ``load_state_dict`` or, worse, a silent partial load.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import zlib
from itertools import chain
from operator import attrgetter
from typing import Iterable

import torch
from torch import nn

from peftspec.core.untrusted import BadText, json_loads

Entry = tuple[str, tuple[int, ...], str]
Tensors = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def named_tensors(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> Tensors:
    """``dict(model.named_parameters())`` and ``dict(model.named_buffers())`` (same
    names, order and de-duplication) in one walk of the model instead of two: on
    a model of thousands of modules each walk costs milliseconds. ``modules``:
    ``dict(model.named_modules())`` where the caller has it (no walk at all)."""
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    # Seen by id(): what torch's own de-duplication compares (Tensor.__hash__ is
    # id()), without a Python-level __hash__ call per tensor.
    seen_params: set[int] = set()
    seen_buffers: set[int] = set()
    for path, module in (modules.items() if modules is not None else model.named_modules()):
        prefix = f"{path}." if path else ""
        for key, t in module._parameters.items():
            if t is not None and id(t) not in seen_params:
                seen_params.add(id(t))
                params[prefix + key] = t
        if module._buffers:
            for key, t in module._buffers.items():
                if t is not None and id(t) not in seen_buffers:
                    seen_buffers.add(id(t))
                    buffers[prefix + key] = t
    return params, buffers


def fingerprint(model: nn.Module, skip: Iterable[str] = (),
                tensors: Tensors | None = None) -> list[Entry]:
    """``(name, shape, dtype)`` of every parameter and buffer, in model order.

    ``tensors``: ``named_tensors(model)`` where the caller already has it.
    """
    params, buffers = tensors if tensors is not None else named_tensors(model)
    skip = set(skip)
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for named in (params, buffers) for name, t in named.items() if name not in skip]


def digest(fp: list[Entry]) -> str:
    """SHA-256 over names and shapes (not dtypes, see :func:`describe_difference`)."""
    text = "".join(f"{name}|{','.join(map(str, shape))}\n" for name, shape, _ in fp)
    return hashlib.sha256(text.encode()).hexdigest()  # one update: same bytes, same digest


class _ShapeText(dict):
    """torch.Size -> its line of the digest text, each distinct shape formatted once."""

    def __missing__(self, shape: torch.Size) -> str:
        text = self[shape] = "|" + ",".join(map(str, shape)) + "\n"
        return text


_shape = attrgetter("shape")


def tensors_digest(tensors: Tensors) -> str:
    """``digest(fingerprint(model, tensors=tensors))``, the same hex string, in one
    pass that builds no entries and formats each distinct shape once (a deep model
    has thousands of tensors but a handful of shapes), the loops in C;
    ``compile_plan`` needs only this."""
    texts = _ShapeText()
    parts: list[str] = []
    for named in tensors:  # name, its shape's text, name, ...
        parts += chain.from_iterable(zip(named, map(texts.__getitem__,
                                                    map(_shape, named.values()))))
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def encode(fp: list[Entry]) -> str:
    raw = json.dumps([[n, list(s), d] for n, s, d in fp], separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


# A fingerprint of the largest models decompresses to a few MiB; a file claiming
# more is a decompression bomb.
MAX_DECODED = 64 << 20


def decode(text: str) -> list[Entry]:
    """The fingerprint :func:`encode` wrote; a file's text may be anything, so any
    damage raises :class:`~peftspec.core.untrusted.BadText` (a ``ValueError``)."""
    try:
        packed = base64.b64decode(text.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_DECODED)
        if inflater.unconsumed_tail:
            raise BadText(f"it inflates to more than {MAX_DECODED >> 20} MiB")
    except (UnicodeEncodeError, binascii.Error, zlib.error) as exc:
        raise BadText(f"not zlib-compressed base64 ({exc})") from None
    entries = json_loads(raw)
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and
            isinstance(e[1], list) and all(isinstance(x, int) for x in e[1]) and
            isinstance(e[2], str) for e in entries):
        raise BadText("not a list of [name, shape, dtype] entries")
    return [(n, tuple(s), d) for n, s, d in entries]


def describe_difference(expected: list[Entry], actual: list[Entry], limit: int = 6) -> list[str]:
    """Differences in names and shapes between two fingerprints, most telling first.

    Dtypes are not compared: an adapter trained on a float32 base may be loaded
    onto the same base in bfloat16 (its tensors are cast on load). An empty
    list means the bases are compatible.
    """
    exp = {n: s for n, s, _ in expected}
    act = {n: s for n, s, _ in actual}
    lines: list[str] = []
    changed = [n for n in exp if n in act and exp[n] != act[n]]
    missing = [n for n in exp if n not in act]
    extra = [n for n in act if n not in exp]
    for n in changed[:limit]:
        lines.append(f"'{n}' has shape {list(act[n])} in this model but {list(exp[n])} in the "
                     "adapter's base")
    if missing:
        lines.append(f"{len(missing)} tensor(s) of the adapter's base are missing from this "
                     f"model, e.g. {', '.join(repr(n) for n in missing[:3])}")
    if extra:
        lines.append(f"this model has {len(extra)} tensor(s) the adapter's base did not, e.g. "
                     f"{', '.join(repr(n) for n in extra[:3])}")
    if len(changed) > limit:
        lines.append(f"... and {len(changed) - limit} more tensors differ in shape")
    return lines
