"""nf4's dequantization by one-word-per-code-byte gathers into a reused index
buffer (plugins/quant.py): the same bits as torchao and as the two-value-row
gather, in every compute dtype, for slices of rows, for outputs it cannot view
as words, and with one scratch buffer shared by weights of different sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftspec
from peftspec.core import packed

pytest.importorskip("torchao")
from peftspec_plugins.quant import _pair_table, _torchao_nf4_tensor  # noqa: E402


def nf4_weight(n_out, n_in, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_out, bias=False)).to(dtype)
    spec = peftspec.parse_spec('[[freeze]]\nmethod = "nf4"\nmodules = ["0"]\nblock_size = 64\n'
                               "scaler_block_size = 4\n")
    original = model[0].weight.detach().clone()
    peftspec.apply_plan(peftspec.compile_plan(spec, model), model)
    return model[0].weight, original


def by_rows_of_two(w):
    """The dequantization by the (256, 2) pair table's rows, as before the word view."""
    s, m = w.stored, w.meta
    dtype, bs = m["dtype"], m["block_size"]
    scalers = (s["scalers"].view(-1, m["scaler_block_size"]) / s["factor"].unsqueeze(-1)) \
        .flatten().to(dtype) + s["mean"]
    dense = _pair_table(dtype, "cpu").index_select(0, s["codes"].to(torch.int32))
    return (dense.view(-1, bs) * scalers.unsqueeze(-1)).view(w.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_word_gather_gives_the_same_bits(dtype):
    w, original = nf4_weight(96, 128, dtype)
    fast = w.dequantize()
    assert fast.dtype == dtype and torch.equal(fast, by_rows_of_two(w))
    if dtype == torch.float32:
        ref = _torchao_nf4_tensor().from_tensor(original, 64, 4)
        assert torch.equal(fast, ref.get_original_weight())
    # into an output it cannot view as words (odd offset): the row gather, same bits
    base = torch.empty(w.numel() + 1, dtype=dtype)
    odd = base[1:].view(w.shape)
    assert torch.equal(w.codec.dequantize(w.stored, w.meta, odd), fast)
    # another dtype than the weight's: computed, then cast
    wide = torch.empty(w.shape, dtype=torch.float64)
    assert torch.equal(w.codec.dequantize(w.stored, w.meta, wide), fast.double())


def test_rows_and_a_shared_index_buffer():
    big, _ = nf4_weight(128, 256, seed=1)
    small, _ = nf4_weight(32, 64, seed=2)
    want_big, want_small = by_rows_of_two(big), by_rows_of_two(small)
    packed.release_scratch()
    for _ in range(2):  # alternating sizes reuse (and grow) one index buffer
        assert torch.equal(small.dequantize(), want_small)
        assert torch.equal(big.dequantize(), want_big)
    out = torch.empty(32, 256)
    assert torch.equal(big.codec.dequantize_rows(big.stored, big.meta, 64, 96, out),
                       want_big[64:96])
    x = torch.randn(3, 256)
    assert torch.equal(nn.functional.linear(x, big), nn.functional.linear(x, want_big))
