"""peftspec's on-disk cache of converted models: folders built once, atomically,
and verified on every use.

Converting a model can be slow (dequantizing a GGUF file takes tens of
seconds, every time, inside transformers), so a converted folder is kept under
the cache root:

* ``$PEFTSPEC_CACHE`` when set, else ``$XDG_CACHE_HOME/peftspec``, else
  ``~/.cache/peftspec`` (the XDG base-directory default);
* one folder per entry, ``ROOT/KIND/NAME``, holding the converted files and a
  ``manifest.json`` written last that lists every file with its size and
  SHA-256, plus whatever the caller records about the source (``source``).

An entry is built in a temporary folder beside it and renamed into place, so
a reader sees no entry or a whole one, never a half-written one (a build
killed midway leaves only a ``.tmp-*`` folder, removed by the next build of
that entry). Every use checks the manifest: a missing or unreadable manifest,
a file missing, of another size, or whose SHA-256 differs (a corrupt entry),
or a manifest of another format version, makes :func:`ensure` rebuild the
entry. Hashing costs about 0.7 s per GB here, small beside a conversion,
and it means a bit flip in 500 MB of weights is caught instead of training on
it. A caller that has other work before it reads the weights (a model
source importing transformers) can ask :func:`ensure` to hash the big files on
a thread (``defer_over``): hashlib releases the GIL, so on a second core the
check costs no wall time, and the caller waits for it (:meth:`Entry.wait`)
before the first byte of weights is used. Builds of one entry by two processes are serialised with a lock file
(``fcntl.flock`` where there is one), so the conversion runs once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from peftspec.core.atomicio import fsync_dir
from peftspec.core.errors import PeftspecError
from peftspec.core.atomicio import atomic_write_bytes

FORMAT = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class CacheError(PeftspecError):
    """The cache folder cannot be used (not writable, not a folder)."""

    exit_code = 2


def root() -> Path:
    """The cache root: ``$PEFTSPEC_CACHE``, ``$XDG_CACHE_HOME/peftspec`` or
    ``~/.cache/peftspec``."""
    explicit = os.environ.get("PEFTSPEC_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "peftspec"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def notify(message: str) -> None:
    """Tell the user what the cache is doing (a conversion takes a while)."""
    print(f"peftspec: {message}", file=sys.stderr, flush=True)


class _Hashing:
    """SHA-256 checks of some of an entry's files, on a thread."""

    def __init__(self, folder: Path, files: dict):
        self._problem: str | None = None
        self._thread = threading.Thread(target=self._run, args=(folder, files), daemon=True,
                                        name="peftspec-cache-verify")
        self._thread.start()

    def _run(self, folder: Path, files: dict) -> None:
        self._problem = _hash_problem(folder, files)

    def problem(self) -> str | None:
        self._thread.join()
        return self._problem


@dataclass(frozen=True)
class Entry:
    """A cache entry: its folder and its manifest; verified, or being verified on a
    thread when ``pending`` is set (call :meth:`wait` before reading its big files)."""

    path: Path
    manifest: dict
    pending: _Hashing | None = field(default=None, compare=False, repr=False)

    def wait(self) -> str | None:
        """The entry's problem found by the deferred hashing (None: it is whole)."""
        return self.pending.problem() if self.pending is not None else None

    @property
    def source(self) -> dict:
        return self.manifest.get("source", {})


def problem(folder: Path) -> str | None:
    """Why the entry in ``folder`` cannot be used, or None when it is whole."""
    why, manifest = _quick_problem(folder)
    return why if why is not None else _hash_problem(folder, manifest["files"])


def _quick_problem(folder: Path) -> tuple[str | None, dict]:
    """The manifest's problems and the files' sizes (no hashing): ``(why, manifest)``,
    the manifest empty when it is unreadable."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST} (an interrupted or foreign folder)", {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable {MANIFEST}: {exc}", {}
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"cache format {manifest.get('format') if isinstance(manifest, dict) else '?'}" \
               f", this peftspec writes {FORMAT}", {}
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or \
            not all(isinstance(info, dict) for info in files.values()):
        return f"{MANIFEST} lists no files", manifest
    for name, info in sorted(files.items()):
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing", manifest
        if size != info.get("size"):
            return f"{name} has {size} bytes, the manifest says {info.get('size')}", manifest
    return None, manifest


def _hash_problem(folder: Path, files: dict) -> str | None:
    for name, info in sorted(files.items()):
        try:
            digest = sha256_file(folder / name)
        except OSError as exc:
            return f"{name} cannot be read: {exc}"
        if digest != info.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest (corrupt)"
    return None


def read(folder: Path, defer_over: int | None = None) -> Entry | None:
    """The entry in ``folder`` when it exists and verifies, else None.

    With ``defer_over``, files larger than that many bytes are hashed on a
    thread: the entry comes back with ``pending`` set, and its :meth:`Entry.wait`
    says whether they match.
    """
    if not folder.is_dir():
        return None
    why, manifest = _quick_problem(folder)
    if why is not None:
        return None
    files = manifest["files"]
    big = {n: i for n, i in files.items() if defer_over is not None and i["size"] > defer_over}
    if _hash_problem(folder, {n: i for n, i in files.items() if n not in big}) is not None:
        return None
    return Entry(folder, manifest, _Hashing(folder, big) if big else None)


def update_source(entry: Entry, source: dict) -> Entry:
    """Rewrite the manifest's ``source`` record (atomically), e.g. a new mtime."""

    manifest = {**entry.manifest, "source": source}
    atomic_write_bytes(entry.path / MANIFEST, _dump(manifest))
    return Entry(entry.path, manifest)


def ensure(folder: Path, build: Callable[[Path], None], *, source: dict,
           is_current: Callable[[Entry], bool] = lambda e: True, what: str = "",
           defer_over: int | None = None) -> Entry:
    """The verified entry at ``folder``, built with ``build(tmp)`` when it is
    missing, corrupt, or not ``is_current`` (stale).

    ``build`` writes the files into the empty folder it is given; this
    function hashes them, writes the manifest (with ``source``), fsyncs, and
    renames the folder into place.

    ``defer_over``: an existing entry's files over that many bytes are hashed
    on a thread (see :func:`read`); the caller must call :meth:`Entry.wait`
    before reading them, and call ``ensure`` again (without ``defer_over``)
    when it reports a problem, which rebuilds the entry.
    """
    entry = read(folder, defer_over) if folder.is_dir() else None
    if entry is not None and is_current(entry):
        return entry
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the cache folder {folder.parent}: {exc}; set "
                         "PEFTSPEC_CACHE to a writable folder") from None
    with _lock(folder):
        entry = read(folder) if folder.is_dir() else None  # another process may have built it
        if entry is not None and is_current(entry):
            return entry
        if folder.exists():
            why = problem(folder) or "stale (its source changed)"
            notify(f"cache entry {folder} is unusable ({why}); rebuilding it")
        _remove_leftovers(folder)
        return _build(folder, build, source, what)


def _build(folder: Path, build: Callable[[Path], None], source: dict, what: str) -> Entry:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}.", dir=folder.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # as mkdir would make it; mkdtemp makes it private
        if what:
            notify(f"{what} (once; cached in {folder})")
        build(tmp)
        files = {}
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _fsync(path)
                files[path.relative_to(tmp).as_posix()] = {
                    "size": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {"format": FORMAT, "source": source, "files": files}
        with open(tmp / MANIFEST, "wb") as f:
            f.write(_dump(manifest))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if folder.exists():  # a corrupt or stale entry: out of the way, then replaced
            old = folder.with_name(f".tmp-{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Entry(folder, manifest)


def _remove_leftovers(folder: Path) -> None:
    """Temporary folders of earlier builds of this entry that never finished
    (we hold the entry's lock, so no build of it is running)."""
    for leftover in folder.parent.glob(f".tmp-{folder.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _lock(folder: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): builds may overlap
        yield
        return
    with open(folder.parent / f".{folder.name}.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _dump(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
