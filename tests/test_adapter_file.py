"""Adapter files: self-description, size, atomic writes, refusals that change nothing."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import peftspec
from peftspec.formats.adapter_file import read_metadata
from peftspec.models.nanogpt import GPT, GPTConfig

SPEC = textwrap.dedent("""
    [spec]
    name = "t"
    [[train]]
    params = ["**.bias"]
    [[reparameterize]]
    method = "lora"
    modules = ["**.q_proj", "**.v_proj"]
    r = 4
    dora = true
""")


def small(**kw):
    return GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, **kw}))


@pytest.fixture
def trained(tmp_path):
    model = small()
    peftspec.apply(peftspec.parse_spec(SPEC, file="t.toml"), model)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "a.safetensors"
    peftspec.save_adapter(model, path)
    return model, path


def state(model):
    return ({n: t.detach().clone() for n, t in model.state_dict().items()},
            dict(model.named_modules()), {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    tensors, modules, flags = before
    assert not peftspec.is_patched(model)
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    assert all(torch.equal(now[n], tensors[n]) for n in tensors)
    assert all(m is modules[n] for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_file_is_self_describing_and_small(trained):
    model, path = trained
    meta = read_metadata(path)
    assert meta["spec"] == SPEC
    assert meta["peftspec_version"] == peftspec.__version__
    raw = sum(p.numel() * p.element_size()
              for p in peftspec.trainable_parameters(model).values())
    assert path.stat().st_size <= raw + 64 * 1024
    # loading needs nothing but the file and a matching base
    fresh = small()
    peftspec.load_adapter(fresh, path)
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("other, says", [
    (dict(n_layer=3), "missing from this model|this model has"),
    (dict(n_embd=48), "has shape"),
])
def test_loading_onto_another_base_names_the_mismatch_and_changes_nothing(trained, other,
                                                                          says):
    _, path = trained
    model = small(**other)
    before = state(model)
    with pytest.raises(peftspec.AdapterFileError, match=says):
        peftspec.load_adapter(model, path)
    assert_unchanged(model, before)


def rewrite(path, tensors=None, metadata=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    if tensors is not None:
        data = tensors(data)
    if metadata is not None:
        meta = metadata(meta)
    save_file(data, str(path), metadata=meta)


@pytest.mark.parametrize("damage, says", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
     "not a readable safetensors file"),
    (lambda p: p.write_bytes(b"\x00" * 3), "not a readable safetensors file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "not a readable"),
    (lambda p: rewrite(p, tensors=lambda d: {k: v for k, v in list(d.items())[1:]}),
     "missing 1 tensor"),
    (lambda p: rewrite(p, tensors=lambda d: {**d, "extra.lora_A": torch.zeros(2)}),
     "unexpected 1 tensor"),
    (lambda p: rewrite(p, tensors=lambda d: {k: (torch.zeros(3, 3) if k.endswith("lora_A")
                                                 else v) for k, v in d.items()}),
     "has shape"),
    (lambda p: rewrite(p, tensors=lambda d: {k: v * float("nan") for k, v in d.items()}),
     "NaN or Inf"),
    (lambda p: rewrite(p, metadata=lambda m: {**m, "format": "something"}),
     "not a peftspec adapter"),
    (lambda p: rewrite(p, metadata=lambda m: {**m, "format_version": "99"}),
     "format version 99"),
    (lambda p: rewrite(p, metadata=lambda m: {**m, "spec": "[[reparameterize]]\nmethod='x'"}),
     "embedded spec"),
])
def test_broken_files_are_refused_and_change_nothing(trained, damage, says):
    _, path = trained
    damage(path)
    model = small()
    before = state(model)
    with pytest.raises(peftspec.AdapterFileError, match=says):
        peftspec.load_adapter(model, path)
    assert_unchanged(model, before)


def test_nonfinite_allowed_on_request(trained):
    _, path = trained
    rewrite(path, tensors=lambda d: {k: v * float("inf") for k, v in d.items()})
    peftspec.load_adapter(small(), path, allow_nonfinite=True)


def test_crash_mid_save_leaves_previous_file_intact(trained, tmp_path):
    model, path = trained
    original = path.read_bytes()
    # a child process starts saving a much larger adapter to the same path and dies
    # (SIGKILL) while writing; the previous file must be untouched
    script = textwrap.dedent(f"""
        import os, signal, peftspec, torch
        import peftspec.formats.adapter_file as af
        from peftspec.models.nanogpt import GPT, GPTConfig
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
        peftspec.apply(peftspec.parse_spec({SPEC!r}), model)
        real_fsync = os.fsync
        def die(fd):
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = die
        peftspec.save_adapter(model, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert path.read_bytes() == original
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert all(n.endswith(".tmp") for n in leftovers)  # a temp file, never the target
    peftspec.load_adapter(small(), path)


def test_save_error_leaves_previous_file_and_no_temp(trained, tmp_path, monkeypatch):
    model, path = trained
    original = path.read_bytes()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        peftspec.save_adapter(model, path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_nothing_is_unpickled():
    """No module of the package or its plugins imports pickle or calls torch.load."""
    from pathlib import Path

    src = Path(peftspec.__file__).parent
    files = sorted(src.rglob("*.py")) + sorted((src.parent / "plugins").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        text = path.read_text()
        for banned in ("import pickle", "from pickle", "torch.load(", "import dill",
                       "import joblib"):
            assert banned not in text, f"{path}: {banned}"


def test_describe_file(trained):
    from peftspec.formats.adapter_file import describe_file

    _, path = trained
    info = describe_file(path)
    assert "blocks.0.attn.q_proj.lora_magnitude" in info["tensors"]
    assert json.dumps(info)


def test_merge_refuses_tied_weights_and_changes_nothing():
    model = small()  # lm_head.weight is tok_emb.weight
    peftspec.apply(peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\n'
                                       'modules = ["lm_head"]\n'), model)
    with torch.no_grad():
        model.lm_head.lora_B.normal_()
    ids = torch.randint(0, 257, (2, 5))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(peftspec.NotMergeableError, match="tied to 'tok_emb'"):
        peftspec.merge(model)
    assert peftspec.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def _lying_header(path, edit):
    """Rewrite the JSON header of ``path`` through ``edit`` and keep the data."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("edit", [
    lambda h: h[_first_tensor(h)].update(data_offsets=[0, 10**9]),        # past the end
    lambda h: h[_first_tensor(h)].update(shape=[999, 999]),               # shape vs size
    lambda h: h[_first_tensor(h)].update(dtype="F64"),                    # dtype vs size
    lambda h: h[_first_tensor(h)].update(dtype="NOPE"),                   # unknown dtype
    lambda h: h[_first_tensor(h)].update(data_offsets=[8, 4]),            # reversed
], ids=["offset-past-end", "shape-lies", "dtype-lies", "unknown-dtype", "reversed-offsets"])
def test_headers_that_lie_are_refused(trained, edit):
    _, path = trained
    _lying_header(path, edit)
    model = small()
    before = state(model)
    with pytest.raises(peftspec.AdapterFileError, match="not a readable safetensors file"):
        peftspec.load_adapter(model, path)
    assert_unchanged(model, before)


def test_huge_header_claim_is_refused_quickly(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{" + b" " * 100)
    with pytest.raises(peftspec.AdapterFileError, match="not a readable"):
        peftspec.load_adapter(small(), path)


def test_bf16_merge_on_cpu_stays_within_bf16_rounding():
    """Merge math runs in float32 and casts once. Bound: 0.05 on logits of order 1
    (bf16 keeps 8 bits of mantissa); the unmerged bf16 model is the reference."""
    model = small().to(torch.bfloat16)
    peftspec.apply(peftspec.parse_spec(SPEC), model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peftspec.adapter_params(model).values():
            p.add_(torch.randn_like(p) * 0.02)
    ids = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        peftspec.merge(model)
        merged = model(ids).logits.float()
    assert (merged - unmerged).abs().max().item() < 0.05
