"""The core writes safetensors without numpy (issue 27, point 1): numpy is not a
dependency of the core package. ``.ci/core_only_smoke.py`` runs the CLI in a
venv without it; here the same is held in-process, with ``Tensor.numpy``
refusing as it does when numpy is absent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load as st_load

import peftspec
from peftspec.core.safetensors_io import DTYPES, serialize, tensor_bytes


@pytest.fixture
def no_numpy(monkeypatch):
    def refuse(self, *a, **k):
        raise RuntimeError("Numpy is not available")
    monkeypatch.setattr(torch.Tensor, "numpy", refuse)


def test_save_and_load_adapter_without_numpy(no_numpy, tmp_path):
    spec = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj"]')
    model = peftspec.apply(spec, peftspec.load_model())
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(0.25)
    peftspec.save_adapter(model, tmp_path / "a.safetensors")
    back = peftspec.load_adapter(peftspec.load_model(), tmp_path / "a.safetensors")
    ours, theirs = peftspec.adapter_params(model), peftspec.adapter_params(back)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_rng_state_without_numpy(no_numpy):
    from peftspec.train.resume import rng_state, set_rng_state
    torch.manual_seed(3)
    state = rng_state()
    a = torch.rand(4)
    set_rng_state(state)
    assert torch.equal(torch.rand(4), a)


_DTYPES = sorted(DTYPES, key=str)


@given(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3),
       st.integers(0, 2**31 - 1), st.booleans())
def test_tensor_bytes_is_what_safetensors_reads(dtype, shape, seed, transpose):
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(shape, generator=g) * 200 - 100).to(dtype)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, 1)  # not contiguous: written in its logical order
    assert len(tensor_bytes(t)) == t.numel() * t.element_size()
    back = st_load(serialize({"t": t}))["t"]
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.reshape(-1).view(torch.uint8),
                       t.contiguous().reshape(-1).view(torch.uint8))
