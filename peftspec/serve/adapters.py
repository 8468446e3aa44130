"""The adapters a server serves: loaded beside each other on one base, each
checked against the base's identity (as :func:`load_adapter` does) and
refused unless it can share a per-row batch.

Files come only from the adapter folder: a name is resolved inside it, and a
path that leaves it (``..``, an absolute path elsewhere) or passes through a
symbolic link is refused before anything is read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import nn

from peftspec.core.errors import PeftspecError
from peftspec.core.patching import remove, state_of
from peftspec.core.rows import rows
from peftspec.formats.adapter_file import load_adapter

# The spec families whose adapters run per row (module-replacing rules); soft
# prompts change the sequence and [[train]] rules change shared base tensors.
ROW_FAMILIES = frozenset({"reparameterize", "augment"})
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ServeError(PeftspecError):
    """A request the server refuses: ``status`` is its HTTP status, ``param``
    the field at fault, ``kind`` OpenAI's error type."""

    exit_code = 2

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code
        self.headers = headers or {}


def resolve_in(folder: Path | None, path: str) -> Path:
    """``path`` (relative to ``folder``, or absolute inside it) as a real file
    inside ``folder``; refuses ``..``, symbolic links and anything outside."""
    if folder is None:
        raise ServeError("loading adapters at run time needs the server started with "
                         "--adapter-dir DIR; none was given", param="lora_path")
    if not isinstance(path, str) or not path:
        raise ServeError("lora_path must be a non-empty string: a file under the adapter "
                         "folder", param="lora_path")
    root = folder.resolve()
    given = Path(path)
    if ".." in given.parts:
        raise ServeError(f"lora_path {path!r} contains '..'; name a file under the adapter "
                         "folder", param="lora_path")
    full = given if given.is_absolute() else root / given
    # every component below the root must be a plain entry, not a link
    try:
        rel = full.relative_to(root)
    except ValueError:
        raise ServeError(f"lora_path {path!r} is outside the adapter folder {root}",
                         param="lora_path") from None
    probe = root
    for part in rel.parts:
        probe = probe / part
        if probe.is_symlink():
            raise ServeError(f"lora_path {path!r} passes through a symbolic link "
                             f"({probe.name}); links are refused", param="lora_path")
    if not full.is_file():
        raise ServeError(f"lora_path {path!r}: no such file in the adapter folder {root}",
                         param="lora_path", status=404, code="not_found")
    if os.path.realpath(full) != str(full):
        raise ServeError(f"lora_path {path!r} does not resolve inside the adapter folder",
                         param="lora_path")
    return full


class AdapterSet:
    """The adapters loaded on ``model``, by name (each with its file)."""

    def __init__(self, model: nn.Module, registry, folder: Path | None = None):
        self.model, self.registry = model, registry
        self.folder = Path(folder) if folder is not None else None
        self.files: dict[str, Path] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def load(self, name: str, path: Path) -> None:
        """Load ``path`` as adapter ``name``; on any problem the set is unchanged
        and a :class:`ServeError` (400) says what is wrong."""
        if not isinstance(name, str) or not NAME.match(name):
            raise ServeError(f"lora_name {name!r} must be 1-64 letters, digits, '.', '_' or "
                             "'-', starting with a letter or digit", param="lora_name")
        if name in self.files:
            raise ServeError(f"an adapter named {name!r} is already loaded; unload it first",
                             param="lora_name")
        try:
            load_adapter(self.model, path, name=name, registry=self.registry)
        except PeftspecError as exc:
            raise ServeError(str(exc), param="lora_path") from None
        why = self._why_not_servable(name)
        if why is not None:
            remove(self.model, name)
            raise ServeError(f"{path.name}: adapter {name!r} cannot be served: {why}",
                             param="lora_path")
        self.files[name] = path
        self.model.eval()

    def unload(self, name: str) -> None:
        if name not in self.files:
            raise ServeError(f"no adapter named {name!r} is loaded; loaded: "
                             f"{', '.join(self.files) or 'none'}", param="lora_name",
                             status=404, code="not_found")
        remove(self.model, name)
        del self.files[name]

    def _why_not_servable(self, name: str) -> str | None:
        adapter = state_of(self.model).adapters[name]
        families = {rec.step.family for rec in adapter.records} | \
            {s.family for s in adapter.plan.steps}
        if not families <= ROW_FAMILIES:
            return (f"its spec has {', '.join(sorted(families - ROW_FAMILIES))} rules, which "
                    "do not run per row in a shared batch (soft prompts change the sequence, "
                    "[[train]] changes base tensors); serve it with `peftspec generate` or "
                    "merge it into the base")
        try:
            with rows(self.model, [name, None]):
                pass
        except (NotImplementedError, PeftspecError) as exc:
            return str(exc)
        return None
