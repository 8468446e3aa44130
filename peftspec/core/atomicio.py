"""Writing files and folders so that a crash or a full disk loses nothing.

Every command that writes goes through here:

* :func:`atomic_write_bytes`: a file appears whole or not at all (temporary
  file in the same folder, fsync, rename, fsync of the folder); the previous
  file stays until the new one is complete.
* :func:`replace_dir`: a folder (a merged model, an HF PEFT export, a
  checkpoint) is built under a temporary name and swapped in with one
  ``renameat2(RENAME_EXCHANGE)``, so the old folder stands under the final
  name until the very instant the new one does; a SIGKILL at any moment
  leaves one of the two, never neither. (Where the kernel or filesystem lacks
  the exchange, two renames are used, and a kill between them leaves the old
  folder under a hidden ``.NAME.old-PID`` name.)
* :func:`writing`: turns ``OSError`` of a write into :class:`WriteError`, one
  line naming the path, what went wrong and the bytes the write needs, and
  checks the free space first where the size is known, so that a full disk is
  reported before anything is written.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from peftspec.core.errors import PeftspecError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class WriteError(PeftspecError, OSError):
    """A file or folder could not be written (full disk, read-only destination, ...).

    Also an ``OSError``, as the failure it reports was, for callers that catch that."""

    exit_code = 1


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': the one byte formatter (the CLI's too)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def free_bytes(path: Path) -> int | None:
    """Bytes available to us on the filesystem holding ``path`` (or its nearest
    existing parent), or ``None`` where that cannot be told."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):  # pragma: no cover - not POSIX
        return None
    return st.f_bavail * st.f_frsize


def _reason(exc: OSError) -> str:
    return {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.ENOENT: "no such folder",
            errno.ENOTDIR: "a path component is not a folder",
            errno.EISDIR: "it is a folder"}.get(exc.errno, exc.strerror or str(exc))


def _error(path: Path, exc: OSError, needed: int | None) -> WriteError:
    msg = f"cannot write {path}: {_reason(exc)}"
    if needed is not None:
        msg += f"; it needs {human_bytes(needed)} ({needed:,} bytes)"
        free = free_bytes(path)
        if free is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            msg += f", {human_bytes(free)} free there"
    return WriteError(msg + "; nothing was replaced")


@contextmanager
def writing(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Report an ``OSError`` inside the block as a :class:`WriteError` for ``path``;
    with ``needed``, refuse up front when the filesystem has less free space."""
    path = Path(path)
    if needed is not None:
        free = free_bytes(path.parent)
        if free is not None and needed > free:
            raise _error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed)
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise _error(path, exc, needed) from None


def check_room(path: str | os.PathLike, needed: int) -> None:
    """Raise the :class:`WriteError` a later write of ``needed`` bytes to ``path``
    would meet (a read-only or unwritable folder, too little space), now: a
    command that works for minutes first (train) fails before, not after."""
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError as exc:
        raise _error(path, exc, needed) from None
    if st.f_flag & os.ST_RDONLY:
        raise _error(path, OSError(errno.EROFS, os.strerror(errno.EROFS)), needed)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _error(path, OSError(errno.EACCES, os.strerror(errno.EACCES)), needed)
    if needed > st.f_bavail * st.f_frsize:
        raise _error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one."""
    path = Path(path)
    with writing(path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # as a plain open() would create it
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (Linux renameat2); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, out: Path) -> None:
    """Put folder ``new`` in place of ``out`` (which may not exist) in one step."""
    new, out = Path(new), Path(out)
    if out.exists() or out.is_symlink():
        if _exchange(new, out):
            fsync_dir(out.parent)
            shutil.rmtree(new, ignore_errors=True)  # now the old folder
            return
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)
    fsync_dir(out.parent)


def staging_dir(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (same filesystem, so it can be swapped in)."""
    out = Path(out)
    parent = out.parent
    with writing(out):
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))


__all__ = ["WriteError", "atomic_write_bytes", "check_room", "free_bytes", "replace_dir",
           "staging_dir", "writing"]
