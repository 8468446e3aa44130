"""A frozen base stored compactly: the tensor type behind ``[[freeze]]``.

A freeze method (nf4, int8, bf16, or a third party's) turns a module's float
``weight`` into a :class:`PackedWeight`: a tensor that reports the original
shape and dtype (so fingerprints, plans and state-dict keys stay those of the
unquantized base) but holds only its codec's *stored* tensors (4-bit codes
and scales, int8 rows and per-row scales, bfloat16 values). Its bytes are
what the promise now covers: they are never written again, through training,
saving, loading, switching or removal.

Computation never keeps a float copy. ``F.linear`` on a packed weight (from a
plain ``nn.Linear``, from LoRA, from a per-row dispatch) runs
:class:`_FrozenLinear`, which dequantizes into a per-thread scratch buffer
that every call reuses, multiplies, and lets the buffer be overwritten by the
next call; the backward pass dequantizes again rather than saving the float
weight (as torchtune's / torchao's ``linear_nf4``, but without a fresh
allocation and its page faults on every call). Any other operation on a packed
weight is refused with a message that says to dequantize explicitly
(:func:`dequantized`), so no code path requantizes or upcasts silently.

Nothing here imports torchao: a codec that needs it imports it when a rule
asks for that codec.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.core.errors import PeftspecError
# which modules are frozen how (re-exported: their home before the split)
from peftspec.core.freeze_state import (STATE_ATTR, FrozenEntry, frozen_modules,  # noqa: F401
                                        frozen_state, storage_options)

aten = torch.ops.aten

#: the attribute prefix of a PackedWeight's inner tensors (see __tensor_flatten__)
INNER = "_stored_"


@dataclass(frozen=True)
class Codec:
    """How one storage format turns back into floats.

    ``dequantize(stored, meta, out)`` writes the dense weight into ``out`` (a
    contiguous tensor of the original shape, in the compute dtype) and returns
    it. ``name`` is the freeze method's name, shown in plans and errors."""

    name: str
    dequantize: Callable[[dict[str, torch.Tensor], dict[str, Any], torch.Tensor], torch.Tensor]
    #: optional ``dequantize_rows(stored, meta, r0, r1, out)``: rows ``r0:r1`` only, so a
    #: large weight is multiplied a slice at a time (a small, cache-warm buffer instead
    #: of one the size of the weight); ``row_align(shape, meta)`` says which row counts
    #: a slice may start at (multiples of it).
    dequantize_rows: Callable | None = None
    row_align: Callable | None = None
    #: optional ``lookup(stored, meta, index, dtype)``: the dense rows ``index`` (a
    #: tensor of row numbers, any shape) in ``dtype``, equal to the same rows of
    #: ``dequantize``; a codec that has it can store an ``nn.Embedding``'s weight
    #: (``F.embedding`` on it reads only the rows looked up)
    lookup: Callable | None = None
    #: optional ``dense(stored, meta, dtype)``: the stored tensor itself where it *is*
    #: the dense weight in ``dtype`` (bf16's values under bf16 compute), else None;
    #: the matmul then reads it in place: no copy, no cast (:class:`_FrozenLinear`)
    dense: Callable | None = None


class PackedWeight(torch.Tensor):
    """A frozen weight in a compact storage format (a wrapper tensor subclass).

    ``stored`` maps names to the tensors that hold the data (the only memory
    it owns); ``meta`` holds the codec's options (block sizes), plain values.
    Its ``shape`` and ``dtype`` are the original weight's.
    """

    stored: dict[str, torch.Tensor]
    meta: dict[str, Any]
    codec: Codec

    @staticmethod
    def __new__(cls, stored: dict[str, torch.Tensor], meta: dict[str, Any], codec: Codec,
                shape, dtype: torch.dtype, requires_grad: bool = False):
        first = next(iter(stored.values()))
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype,
                                                device=first.device,
                                                requires_grad=requires_grad)
        t.stored, t.meta, t.codec = dict(stored), dict(meta), codec
        for name, inner in t.stored.items():  # __tensor_flatten__'s keys are attributes
            setattr(t, INNER + name, inner)
        return t

    def __init__(self, *args, **kwargs):  # everything happened in __new__
        pass

    def __repr__(self) -> str:
        return (f"PackedWeight({self.codec.name}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype}, stored={stored_bytes(self)} bytes)")

    def __tensor_flatten__(self):
        # torch's wrapper-subclass protocol (torch.compile, FSDP2, pytree): the names
        # of the inner tensors, each an attribute (``getattr(t, name)``); prefixed,
        # since a codec's own names may be Tensor's (bf16's "values")
        return [INNER + k for k in self.stored], (self.meta, self.codec, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        meta, codec, dtype = ctx
        stored = {k[len(INNER):] if k.startswith(INNER) else k: v for k, v in inner.items()}
        return PackedWeight(stored, meta, codec, outer_size, dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new dense tensor (the original dtype unless ``dtype``)."""
        out = torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
        return self.codec.dequantize(self.stored, self.meta, out)

    def same_storage_format(self, other: "PackedWeight") -> bool:
        return (self.codec.name == other.codec.name and self.meta == other.meta and
                self.shape == other.shape and self.dtype == other.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return frozen_linear(*args, **kwargs)
        if func is F.embedding:
            return frozen_embedding(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            w = args[0]
            return PackedWeight(w.stored, w.meta, w.codec, w.shape, w.dtype)
        if func is aten.clone.default:
            w = args[0]
            return PackedWeight({k: v.clone() for k, v in w.stored.items()}, w.meta, w.codec,
                                w.shape, w.dtype)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(src, PackedWeight) and dst.same_storage_format(src):
                for k, v in dst.stored.items():
                    v.copy_(src.stored[k])
                return dst
            raise PeftspecError(
                f"refusing to write a {dst.codec.name}-frozen weight: that would requantize "
                "it silently; dequantize first (peftspec.core.packed.thaw / "
                "peftspec.core.packed.dequantized) and write the plain tensor")
        if func is aten._to_copy.default:  # .float(), .to(dtype): an explicit dense copy
            w = args[0]
            dtype = kwargs.get("dtype") or w.dtype
            if kwargs.get("device") not in (None, w.device):
                raise PeftspecError(f"moving a {w.codec.name}-frozen weight between devices is "
                                    "not supported; quantize on the target device")
            return w.dequantize(dtype)
        if func in (aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default,
                    aten.new_full.default):  # a new dense tensor of the weight's dtype/device
            w, rest = args[0], args[1:]
            kwargs = {"dtype": w.dtype, "device": w.device,
                      **{k: v for k, v in kwargs.items() if v is not None}}
            make = {aten.new_empty.default: torch.empty, aten.new_zeros.default: torch.zeros,
                    aten.new_ones.default: torch.ones}.get(func)
            if make is None:
                return torch.full(rest[0], rest[1], **kwargs)
            return make(rest[0], **kwargs)
        if func in (aten.is_pinned.default,):
            return False
        name = getattr(func, "__name__", str(func))
        codec = next((a.codec.name for a in args if isinstance(a, PackedWeight)), "packed")
        raise PeftspecError(
            f"operation {name} is not supported on a {codec}-frozen weight ([[freeze]]): "
            "call peftspec.core.packed.dequantized(weight) for a dense copy")


def is_packed(t: Any) -> bool:
    return isinstance(t, PackedWeight)


def stored_tensors(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors that hold ``t``'s data (``{"": t}`` for a plain tensor)."""
    return dict(t.stored) if isinstance(t, PackedWeight) else {"": t}


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` actually occupies: its stored tensors for a packed weight."""
    if isinstance(t, PackedWeight):
        return sum(v.numel() * v.element_size() for v in t.stored.values())
    return t.numel() * t.element_size()


def dequantized(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` itself when plain; a fresh dense copy (original dtype) when packed.

    For code that needs the weight's values (DoRA's norm, merge): the copy is
    a temporary the caller drops, never stored on a module."""
    if isinstance(t, PackedWeight):
        return t.dequantize(dtype)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


# --- computing through a packed weight ------------------------------------------------

_scratch = threading.local()

#: weights above this many elements are multiplied a slice of rows at a time
CHUNK_ELEMENTS = 1 << 24


def _buffer(numel: int, dtype: torch.dtype, device, purpose: str = "dense") -> torch.Tensor:
    bufs = _scratch.__dict__.setdefault("bufs", {})
    key = (purpose, dtype, device)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _row_chunk(w: PackedWeight) -> int | None:
    """Rows per slice for ``w``, or None to dequantize it whole."""
    codec = w.codec
    if codec.dequantize_rows is None or w.numel() <= CHUNK_ELEMENTS:
        return None
    n_out, n_in = w.shape
    align = codec.row_align(tuple(w.shape), w.meta) if codec.row_align else 1
    rows = max(align, (CHUNK_ELEMENTS // n_in) // align * align)
    return rows if rows < n_out else None


def _rows_dense(w: PackedWeight, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    out = _buffer((r1 - r0) * w.shape[1], dtype, w.device).view(r1 - r0, w.shape[1])
    return w.codec.dequantize_rows(w.stored, w.meta, r0, r1, out)


def _scratch_dense(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``w`` dequantized into this thread's reusable buffer for ``dtype``.

    One buffer per (thread, dtype, device), grown to the largest weight seen:
    allocating tens of MiB per call costs page faults on the CPU allocator,
    which return memory to the system for large blocks. The buffer holds no
    state between calls (each call overwrites it) and is freed with
    :func:`release_scratch`."""
    out = _buffer(w.numel(), dtype, w.device).view(w.shape)
    return w.codec.dequantize(w.stored, w.meta, out)


def codec_scratch(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """This thread's reusable 1-D buffer for a codec's temporaries (nf4's code
    indices), never the one a weight is dequantized into: garbage on return,
    valid until the next request for the same dtype and device."""
    return _buffer(numel, dtype, device, "codec")


def release_scratch() -> None:
    """Free this thread's dequantization buffers."""
    _scratch.bufs = {}


def scratch_bytes() -> int:
    bufs = getattr(_scratch, "bufs", None) or {}
    return sum(b.numel() * b.element_size() for b in bufs.values())


class _FrozenLinear(torch.autograd.Function):
    """``x @ Wᵀ`` for a packed ``W`` that never requires grad: the dense ``W``
    lives only during each matmul (forward, and again in backward)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight  # the packed tensor: no float copy is saved
        ctx.view = _dense_view(weight, x)
        if ctx.view is not None:  # the stored tensor is the weight in the compute dtype
            ctx.x_dtype = x.dtype
            return F.linear(x.to(ctx.view.dtype), ctx.view)
        rows = _row_chunk(weight)
        if rows is None:
            return F.linear(x, _scratch_dense(weight, x.dtype))
        n_out, n_in = weight.shape
        x2 = x.reshape(-1, n_in)
        # the output is allocated in its final shape and returned as is: a view
        # returned from a custom Function cannot be written in place (LoRA adds
        # its update to the base output with addmm_)
        out = x.new_empty((*x.shape[:-1], n_out))
        out2 = out.view(-1, n_out)
        for r0 in range(0, n_out, rows):
            r1 = min(n_out, r0 + rows)
            out2[:, r0:r1] = x2 @ _rows_dense(weight, r0, r1, x.dtype).t()
        return out

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = ctx.weight
        if ctx.view is not None:
            return (grad.to(ctx.view.dtype) @ ctx.view).to(ctx.x_dtype), None
        rows = _row_chunk(weight)
        if rows is None:
            return grad @ _scratch_dense(weight, grad.dtype), None
        n_out, n_in = weight.shape
        g2 = grad.reshape(-1, n_out)
        gx = g2.new_zeros((g2.shape[0], n_in))
        for r0 in range(0, n_out, rows):
            r1 = min(n_out, r0 + rows)
            gx.addmm_(g2[:, r0:r1], _rows_dense(weight, r0, r1, grad.dtype))
        return gx.view(*grad.shape[:-1], n_in), None


def _dense_view(weight: PackedWeight, x: torch.Tensor) -> torch.Tensor | None:
    """The codec's stored tensor that is the dense weight in ``x``'s compute dtype
    (autocast's, where it is on), or None."""
    if weight.codec.dense is None or not x.is_floating_point():
        return None
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return weight.codec.dense(weight.stored, weight.meta, dtype)


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear(x, weight, bias)``, through :class:`_FrozenLinear` when ``weight``
    is packed (exactly ``F.linear`` otherwise, bit for bit)."""
    if not isinstance(weight, PackedWeight):
        return F.linear(x, weight, bias)
    if weight.requires_grad:
        raise PeftspecError(f"a {weight.codec.name}-frozen weight cannot be trained; "
                            "train an adapter beside it")
    if torch.compiler.is_compiling():  # traced: the dense weight, for the compiler to fuse
        out = F.linear(x, weight.dequantize(x.dtype))
    else:
        out = _FrozenLinear.apply(x, weight)
    if bias is not None:
        out = out + bias
    return out


def frozen_embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx=None,
                     max_norm=None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                     sparse: bool = False) -> torch.Tensor:
    """``F.embedding`` on a packed weight: the looked-up rows, dequantized (the
    original dtype), and nothing else. The weight never requires grad, so
    ``padding_idx``, ``scale_grad_by_freq`` and ``sparse`` (gradient options)
    change nothing; ``max_norm`` would renormalize rows in place and is refused."""
    if not isinstance(weight, PackedWeight):
        return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                           sparse)
    codec = weight.codec
    if codec.lookup is None:
        raise PeftspecError(f"a {codec.name}-frozen weight cannot be looked up as an "
                            "embedding: its storage format has no row lookup")
    if max_norm is not None:
        raise PeftspecError(f"an Embedding with max_norm rewrites its rows on lookup; its "
                            f"{codec.name}-frozen weight cannot be written")
    if weight.requires_grad:
        raise PeftspecError(f"a {codec.name}-frozen weight cannot be trained; "
                            "train an adapter beside it")
    return codec.lookup(weight.stored, weight.meta, input, weight.dtype)


def install_weight(module: nn.Module, value: torch.Tensor, name: str = "weight") -> None:
    """Write ``value`` into ``module``'s parameter ``name``: in place for a plain
    tensor; a packed one is replaced by a new plain parameter of its original
    dtype (merge writes dense weights, it never requantizes)."""
    old = module._parameters[name]
    if isinstance(old, PackedWeight):
        module._parameters[name] = nn.Parameter(value.to(old.dtype).contiguous(),
                                                requires_grad=False)
    else:
        with torch.no_grad():
            old.copy_(value)


def thaw(model: nn.Module) -> list[str]:
    """Replace every packed weight by a dense parameter of its original dtype
    (the dequantized values); returns the paths thawed. For writing a merged
    model: safetensors stores plain tensors only."""
    done = []
    for path, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if isinstance(p, PackedWeight):
                module._parameters[pname] = nn.Parameter(p.dequantize(), requires_grad=False)
                done.append(f"{path}.{pname}" if path else pname)
    model.__dict__.pop(STATE_ATTR, None)
    return done


def packed_parameters(model: nn.Module) -> dict[str, PackedWeight]:
    """Every packed parameter of ``model`` by its full name."""
    return {n: p for n, p in model.named_parameters() if isinstance(p, PackedWeight)}


__all__ = ["Codec", "FrozenEntry", "PackedWeight", "codec_scratch", "dequantized",
           "frozen_linear", "frozen_modules", "install_weight", "is_packed", "packed_parameters",
           "release_scratch", "storage_options", "stored_bytes", "stored_tensors", "thaw"]
