"""Fuzzing the GGUF reader (``gguf:PATH``): a tiny Llama GGUF written by the
``gguf`` package, mutated (bytes overwritten in the header and metadata, where
counts, lengths and types live; truncations; random bytes), must load or fail
with a PeftspecError naming the file, never another exception, never a hang,
and never leave a cache entry behind for a file that did not load. The rule
and the counters are those of tests/fuzzing.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from fuzzing import outcome  # noqa: E402
from gguf_tiny import write_tiny_llama  # noqa: E402

from peftspec.models.gguf import folder_for  # noqa: E402

FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    path = write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", layers=1)
    return path.read_bytes()


@st.composite
def mutated(draw, raw: bytes) -> bytes:
    kind = draw(st.sampled_from(["overwrite", "truncate", "overwrite-many"]))
    data = bytearray(raw)
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    head = min(len(data), 4096)  # magic, version, counts, metadata keys and lengths
    for _ in range(1 if kind == "overwrite" else draw(st.integers(2, 8))):
        at = draw(st.integers(4, head - 1))  # keep the magic: past it, the parser runs
        value = draw(st.one_of(st.binary(min_size=1, max_size=8),
                               st.sampled_from([b"\xff" * 8, b"\x00" * 8,
                                                (2 ** 31).to_bytes(4, "little"),
                                                (2 ** 62).to_bytes(8, "little")])))
        data[at:at + len(value)] = value
    return bytes(data)


def load_in_fresh_cache(path: Path) -> None:
    cache = Path(tempfile.mkdtemp(prefix="peftspec-fuzz-cache-"))
    old = os.environ.get("PEFTSPEC_CACHE")
    os.environ["PEFTSPEC_CACHE"] = str(cache)
    try:
        try:
            folder_for(path)
        except BaseException:
            # a file that did not load leaves no entry to be found later
            entries = [p for p in cache.rglob("manifest.json")]
            assert not entries, f"a failed load left {entries}"
            raise
    finally:
        if old is None:
            os.environ.pop("PEFTSPEC_CACHE", None)
        else:
            os.environ["PEFTSPEC_CACHE"] = old
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.slow
@FIXTURES
@given(data=st.data())
def test_gguf_reader_mutated_files(data, tiny_bytes, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(data.draw(mutated(tiny_bytes)))
    # a file that still loads is converted (transformers' loader, ~1 s of CPU for
    # this tiny model); one that fails must fail within the usual second
    outcome("gguf: mutated tiny Llama", load_in_fresh_cache, path, limit_s=5.0)


@FIXTURES
@given(data=st.binary(max_size=256))
def test_gguf_reader_random_bytes(data, tmp_path):
    path = tmp_path / "r.gguf"
    path.write_bytes(b"GGUF" + data)
    outcome("gguf: random bytes after the magic", load_in_fresh_cache, path)
