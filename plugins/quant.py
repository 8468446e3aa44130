"""Freeze methods: how the frozen base is stored (``[[freeze]]``).

* ``nf4``: QLoRA's 4-bit NormalFloat with double-quantized block scales
  (Dettmers et al. 2023), in torchao's format: ``to_nf4(w, block_size,
  scaler_block_size)`` computes the scales exactly as torchao does, codes
  are the nearest NF4 value. About 4.13 bits per weight at the defaults
  (0.129 of float32). Needs the ``peftspec[quant]`` extra (torchao), imported
  only when a rule asks for nf4.
* ``int8``: weight-only, symmetric, one float32 scale per output row
  (``absmax/127``): 8.0x smaller than float32 plus 4 bytes a row. Own code,
  no dependency: it is twenty lines, and torchao's int8 tensor types change
  layout from release to release.
* ``bf16``: frozen weights cast to bfloat16; everything trainable keeps its
  dtype and the matmul runs in the activations' dtype.

int8 and bf16 also store an ``nn.Embedding``'s weight (a lookup dequantizes
only the rows it reads: one scale per row is one per token); nf4 stores
Linear weights only, as QLoRA does (its blocks run across a row's values,
and bitsandbytes and torchao keep embeddings in the compute dtype).

Each stores the weight as a :class:`peftspec.core.packed.PackedWeight`; its
``dequantize`` is the one fast path every forward goes through.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from peftspec.plugin_api import hookimpl, option, selectors
from peftspec.plugin_api import Codec, PackedWeight, codec_scratch
from peftspec.plugin_api import FreezeMethod
from peftspec.plugin_api import quiet_torchao

# The NF4 code book (QLoRA's Appendix E), as torchao writes it.
NF4_VALUES = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796,
              0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)


def _linear_only(module: nn.Module, method: str) -> str | None:
    if isinstance(module, nn.Embedding):
        return (f"{method} stores Linear weights; an Embedding's rows are looked up, not "
                "multiplied (exclude it, or mark the rule optional = true)")
    if not isinstance(module, nn.Linear):
        return (f"{method} stores nn.Linear weights only; this is a "
                f"{type(module).__name__} (exclude it, or mark the rule optional = true)")
    if module.weight.dim() != 2:
        return f"{method} needs a 2-D weight"
    return None


def _linear_or_embedding(module: nn.Module, method: str) -> str | None:
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return ("an Embedding with max_norm rewrites its rows on every lookup; "
                    f"{method} storage is never written (exclude it)")
        return None
    return _linear_only(module, method)


# --- nf4 ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NF4Options:
    modules: tuple[str, ...] = selectors(doc="nn.Linear modules whose weight is stored in NF4")
    block_size: int = option(64, doc="weights per absmax scale", min=2)
    scaler_block_size: int = option(256, doc="scales per int8 double-quantization block", min=1)


def _torchao_nf4_tensor():
    """torchao's ``NF4Tensor`` class: imported only here, when a rule asks for nf4,
    with its kernel-loading chatter kept off the terminal (peftspec.core.quiet)."""

    with quiet_torchao():
        try:  # torchao >= 0.15
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor
        except ImportError:
            try:
                from torchao.dtypes.nf4tensor import NF4Tensor
            except ImportError as exc:
                raise RuntimeError(
                    "method 'nf4' needs torchao: pip install 'peftspec[quant]'") from exc
    return NF4Tensor


@functools.lru_cache(maxsize=1)
def _has_torchao() -> bool:
    """Whether torchao is installed, without importing it (a compile-time check)."""
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


@functools.lru_cache(maxsize=16)
def _pair_table(dtype: torch.dtype, device: str) -> torch.Tensor:
    """(256, 2): the two NF4 values each code byte holds (high nibble first)."""
    lut = torch.tensor(NF4_VALUES, dtype=dtype, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([lut[byte >> 4], lut[byte & 15]], dim=1).contiguous()


def _nf4_scalers(stored, meta, dtype):
    n_sb = stored["scalers"].numel() // meta["scaler_block_size"]
    q = stored["scalers"].view(n_sb, meta["scaler_block_size"])
    # as torchao's NF4Tensor.dequantize_scalers, operation for operation
    return (q / stored["factor"].unsqueeze(-1)).flatten().to(dtype) + stored["mean"]


#: the integer type as wide as two values of a float type: a pair table viewed as
#: one word per code byte, so that the lookup gathers single elements, not rows
_PAIR_WORD = {torch.float32: torch.int64, torch.bfloat16: torch.int32,
              torch.float16: torch.int32}


@functools.lru_cache(maxsize=16)
def _pair_words(dtype: torch.dtype, device: str) -> torch.Tensor:
    """(256,): :func:`_pair_table` viewed as one ``_PAIR_WORD`` word per code byte."""
    return _pair_table(dtype, device).view(_PAIR_WORD[dtype]).view(-1)


def _nf4_dequantize(stored, meta, out):
    """Codes to floats in two passes (one gather of value pairs, one multiply by
    the block scales), written straight into ``out``; torchao's generic path
    takes seven (two shifts to int64, two lookups, two multiplies, a stack).

    The gather reads the pair table as one integer word per code byte (a
    float32 pair is an int64), a 1-D gather of single elements, several times
    faster on the CPU than gathering 2-element rows; the codes' int32 indices
    go into a reused scratch buffer (no allocation per call). The values are
    the same bits either way."""
    dtype = meta["dtype"]
    codes = stored["codes"]
    bs = meta["block_size"]
    scalers = _nf4_scalers(stored, meta, dtype)
    if torch.compiler.is_compiling():
        # traced: made in the trace, not a cached tensor or a scratch buffer from outside it
        table = _pair_table.__wrapped__(dtype, str(codes.device))
        dense = table.index_select(0, codes.to(torch.int32)).view(-1, bs) * scalers.unsqueeze(-1)
        return out.copy_(dense.view(out.shape))
    word = _PAIR_WORD.get(dtype)
    if out.dtype == dtype and word is not None and out.is_contiguous() and \
            out.storage_offset() % 2 == 0:
        index = codec_scratch(codes.numel(), torch.int32, codes.device)
        index.copy_(codes)
        torch.index_select(_pair_words(dtype, str(codes.device)), 0, index,
                           out=out.view(-1).view(word))
        out.view(-1, bs).mul_(scalers.unsqueeze(-1))
        return out
    table = _pair_table(dtype, str(codes.device))
    if out.dtype == dtype:
        torch.index_select(table, 0, codes.to(torch.int32), out=out.view(-1, 2))
        out.view(-1, bs).mul_(scalers.unsqueeze(-1))
        return out
    dense = table.index_select(0, codes.to(torch.int32)).view(-1, bs) * scalers.unsqueeze(-1)
    return out.copy_(dense.view(out.shape))


def _nf4_row_align(shape, meta) -> int:
    """Rows a slice starts at: whole scaler blocks (block_size * scaler_block_size weights)."""
    span = meta["block_size"] * meta["scaler_block_size"]
    return span // math.gcd(span, shape[1])


def _nf4_dequantize_rows(stored, meta, r0, r1, out):
    """Rows ``r0:r1`` (aligned by _nf4_row_align), exactly as the whole weight gives them."""
    n_in = out.shape[1]
    bs, sbs = meta["block_size"], meta["scaler_block_size"]
    b0, b1 = r0 * n_in // bs, r1 * n_in // bs
    part = {"codes": stored["codes"][r0 * n_in // 2:r1 * n_in // 2],
            "scalers": stored["scalers"][b0:b1],
            "factor": stored["factor"][b0 // sbs:b1 // sbs], "mean": stored["mean"]}
    return _nf4_dequantize(part, meta, out)


NF4_CODEC = Codec("nf4", _nf4_dequantize, _nf4_dequantize_rows, _nf4_row_align)


def _nf4_codes(w: torch.Tensor, block_size: int, chunk: int = 1 << 24) -> torch.Tensor:
    """The nearest NF4 index of each weight, as torchao's ``quantize_tensor_nearest``
    picks it (lowest index on a tie: the same |x - v| compared), packed two per
    byte; by a binary search on the code book instead of torchao's 16-way
    distance table (several times faster), 16M weights at a time."""
    flat = w.flatten()
    n_blocks = flat.numel() // block_size
    blocks = flat.view(n_blocks, block_size)
    scales = blocks.abs().max(dim=1, keepdim=True).values
    lut = torch.tensor(NF4_VALUES, dtype=w.dtype, device=w.device)
    out = torch.empty(flat.numel(), dtype=torch.uint8, device=w.device)
    rows = max(1, chunk // block_size)
    for start in range(0, n_blocks, rows):
        scaled = (blocks[start:start + rows] / scales[start:start + rows]).flatten()
        hi = torch.bucketize(scaled, lut, out_int32=True).clamp_(max=15)
        lo = (hi - 1).clamp_(min=0)
        closer_hi = (scaled - lut.index_select(0, hi)).abs_() < \
            (scaled - lut.index_select(0, lo)).abs_()
        idx = torch.where(closer_hi, hi, lo)
        idx.masked_fill_(scaled.isnan(), 0)  # an all-zero block (0/0): torchao's argmin is 0
        out[start * block_size:(start + rows) * block_size] = idx
    return out[::2] << 4 | out[1::2]


class NF4(FreezeMethod):
    name = "nf4"
    Options = NF4Options
    summary = "4-bit NormalFloat with double-quantized scales (QLoRA; torchao's format)"

    def check(self, module, step):
        why = _linear_only(module, "nf4")
        if why:
            return why
        if not _has_torchao():
            return "nf4 needs torchao, which is not installed: pip install 'peftspec[quant]'"
        o = step.options
        n = module.weight.numel()
        if n % (2 * o.block_size):
            return (f"its {n} weights are not divisible by block_size = {o.block_size} "
                    "(times 2: two codes a byte)")
        blocks = n // o.block_size
        if blocks % o.scaler_block_size:
            fits = next(s for s in range(o.scaler_block_size, 0, -1) if blocks % s == 0)
            return (f"its {blocks} blocks are not divisible by scaler_block_size = "
                    f"{o.scaler_block_size} (scaler_block_size = {fits} divides them)")
        return None

    def stored_bytes(self, module, step):
        n = module.weight.numel()
        o = step.options
        item = module.weight.element_size()
        n_blocks = n // o.block_size
        return n // 2 + n_blocks + (n_blocks // o.scaler_block_size) * item + item

    def pack(self, weight, step):
        o = step.options
        w = weight.detach().contiguous()
        # torchao's double-quantized scales, by torchao itself; the codes are the
        # ones its quantize_tensor_nearest picks, by a faster search (_nf4_codes).
        scalers, factor, mean = _torchao_nf4_tensor().double_quantize_scalers(
            w.flatten(), o.block_size, o.scaler_block_size)
        codes = _nf4_codes(w, o.block_size)
        stored = {"codes": codes, "scalers": scalers, "factor": factor, "mean": mean}
        meta = {"block_size": o.block_size, "scaler_block_size": o.scaler_block_size,
                "dtype": w.dtype}
        return PackedWeight(stored, meta, NF4_CODEC, w.shape, w.dtype)


# --- int8 --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int8Options:
    modules: tuple[str, ...] = selectors(doc="nn.Linear or nn.Embedding modules whose weight "
                                                 "is stored in int8")


def _int8_dequantize(stored, meta, out):
    return torch.mul(stored["q"], stored["scale"].unsqueeze(-1), out=out)


def _int8_dequantize_rows(stored, meta, r0, r1, out):
    return torch.mul(stored["q"][r0:r1], stored["scale"][r0:r1].unsqueeze(-1), out=out)


def _int8_lookup(stored, meta, index, dtype):
    rows = torch.mul(stored["q"][index], stored["scale"][index].unsqueeze(-1))
    return rows if rows.dtype == dtype else rows.to(dtype)


INT8_CODEC = Codec("int8", _int8_dequantize, _int8_dequantize_rows, lookup=_int8_lookup)


class Int8(FreezeMethod):
    name = "int8"
    Options = Int8Options
    summary = "weight-only int8, one scale per output row (absmax / 127)"

    def check(self, module, step):
        return _linear_or_embedding(module, "int8")

    def stored_bytes(self, module, step):
        return module.weight.numel() + module.weight.shape[0] * 4

    def pack(self, weight, step):
        w = weight.detach().float()
        scale = w.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
        q = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return PackedWeight({"q": q, "scale": scale}, {}, INT8_CODEC, weight.shape,
                            weight.dtype)


# --- bf16 --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BF16Options:
    modules: tuple[str, ...] = selectors(doc="nn.Linear or nn.Embedding modules whose weight "
                                                 "is kept in bfloat16")


def _bf16_dequantize(stored, meta, out):
    return out.copy_(stored["values"])


def _bf16_rows(stored, meta, r0, r1, out):
    return out.copy_(stored["values"][r0:r1])


def _bf16_lookup(stored, meta, index, dtype):
    return stored["values"][index].to(dtype)


def _bf16_dense(stored, meta, dtype):
    """Under bf16 compute the stored values are the weight: read in place."""
    return stored["values"] if dtype == torch.bfloat16 else None


# named functions, not lambdas: a codec travels in __tensor_flatten__'s context,
# which torch.compile's graph cache pickles
BF16_CODEC = Codec("bf16", _bf16_dequantize, _bf16_rows, lookup=_bf16_lookup,
                   dense=_bf16_dense)


class BF16(FreezeMethod):
    name = "bf16"
    Options = BF16Options
    summary = "frozen weights in bfloat16; trainable tensors keep their dtype"

    def check(self, module, step):
        why = _linear_or_embedding(module, "bf16")
        if why is None and module.weight.dtype == torch.bfloat16:
            return "its weight is bfloat16 already"
        return why

    def stored_bytes(self, module, step):
        return module.weight.numel() * 2

    def pack(self, weight, step):
        return PackedWeight({"values": weight.detach().to(torch.bfloat16)}, {}, BF16_CODEC,
                            weight.shape, weight.dtype)


@hookimpl
def register_methods(register):
    register(NF4())
    register(Int8())
    register(BF16())
