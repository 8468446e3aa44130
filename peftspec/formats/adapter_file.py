"""Adapter files: one self-describing safetensors file per adapter.

The file holds the trainable tensors keyed by their names in the patched
model's state dict (``blocks.0.attn.q_proj.lora_A``, ``blocks.0.ln1.bias``),
the persistent buffers the adapter's modules hold (:mod:`peftspec.core.buffers`;
a file written before they were saved has none, and loads as before) and
string metadata:

========================  ==================================================
``format``                ``peftspec.adapter``
``format_version``        ``1``
``peftspec_version``      the writer's version
``spec``                  the spec's TOML text (re-compiled on load)
``base_digest``           SHA-256 of the base's tensor names and shapes
``base_fingerprint``      the same list, zlib-compressed JSON in base64, used
                          to say *what* differs on a mismatch (omitted for
                          bases so large it would not fit in 48 KiB)
``targets``               JSON: each step's target and its module's class
``task``, ``labels``      written by ``peftspec train`` for classification:
                          ``sequence-classification`` and a JSON list of the
                          labels, index = class id (``["neg", "pos"]``)
========================  ==================================================

Writes are atomic (temporary file in the same folder, fsync, rename): a crash
mid-save leaves the previous file intact. Loads validate everything before
touching the model, and roll back if anything fails after: a failed load
leaves the model exactly as it was. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from peftspec.core.version import __version__
from peftspec.core.atomicio import atomic_write_bytes
from peftspec.core.errors import AdapterFileError, PeftspecError, SpecError
from peftspec.core.packed import storage_options
from peftspec.core.fingerprint import decode, describe_difference, digest, encode, fingerprint
from peftspec.core.blame import owner, reraise
from peftspec.core.buffers import adapter_buffers
from peftspec.core.method import adapter_params, adapter_state, load_adapter_state
from peftspec.core.patching import (DEFAULT_NAME, active_adapter, apply_plan, base_view, remove, state_of,
                       use, using)
from peftspec.core.safetensors_io import serialize
from peftspec.core.plan import compile_plan
from peftspec.core.spec import parse_spec

FORMAT = "peftspec.adapter"
FORMAT_VERSION = "1"
MAX_FINGERPRINT_CHARS = 48 * 1024
RESERVED = ("format", "format_version", "peftspec_version", "spec", "base_digest",
            "base_fingerprint", "targets")


def file_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: the adapter modules' state, the
    persistent buffers the adapter added (:mod:`peftspec.core.buffers`) and the
    base parameters ``[[train]]`` made trainable."""
    state = state_of(model)
    out = dict(_module_hook(model, adapter_state, "adapter_state"))
    for name, (t, persistent) in adapter_buffers(model).items():
        if persistent and name not in out:  # (an adapter_state() may hold it already)
            out[name] = t
    params = dict(model.named_parameters())
    for name in state.trained_base_names():
        out[name] = params[name]
    return out


def _module_hook(model: nn.Module, fn, hook: str, *args):
    """``fn(model, *args)``, an adapter module's exception named (core.blame): the
    distribution and method whose step built the module, the rule, its spec line."""
    try:
        return fn(model, *args)
    except Exception as exc:
        path = getattr(exc, "peftspec_module", None)
        state = state_of(model)
        rec = owner(state.records, path) if path is not None else None
        if rec is None:
            raise
        reraise(exc, state.current.registry, rec.step, f"{hook} of module '{path}'",
                state.plan.spec.file)


def save_adapter(model: nn.Module, path: str | os.PathLike, *, name: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write the active adapter (or adapter ``name``) to ``path`` atomically.

    ``tensors``: the values to write instead of :func:`file_tensors`'s (same
    keys); a sharded (FSDP) run passes the whole tensors it gathered.
    ``metadata``: extra string entries for the header (a classifier's ``task``
    and ``labels``); they may not replace the keys peftspec writes itself.
    """
    if name is not None and name != active_adapter(model):
        with using(model, name):
            return save_adapter(model, path, tensors=tensors, metadata=metadata)
    state = state_of(model)
    if tensors is None:
        tensors = file_tensors(model)
    base_fp = fingerprint(model, skip={*adapter_params(model), *adapter_buffers(model)})
    if digest(base_fp) != state.plan.base_digest:
        raise PeftspecError("the model's base tensors changed names or shapes since the "
                            "adapter was applied; cannot describe its base")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftspec_version": __version__,
        "spec": state.plan.spec.text,
        "base_digest": state.plan.base_digest,
        # what each step targeted, for tools that need the module kinds (export
        # to HF PEFT sets fan_in_fan_out for GPT-2's Conv1D)
        "targets": json.dumps({r.step.target: type(r.original).__name__
                               for r in state.records}, separators=(",", ":")),
    }
    encoded = encode(base_fp)
    if len(encoded) <= MAX_FINGERPRINT_CHARS:
        header["base_fingerprint"] = encoded
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise PeftspecError(f"adapter metadata must map strings to strings, got "
                                f"{key!r}: {value!r:.40}")
        if key in header or key in RESERVED:
            raise PeftspecError(f"adapter metadata key {key!r} is peftspec's own")
        header[key] = value
    data = serialize(tensors, header)
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The adapter file's metadata, validated; raises :class:`AdapterFileError`."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not a peftspec adapter (metadata 'format' is "
                               f"{meta.get('format')!r}, expected {FORMAT!r}); for HF PEFT "
                               "adapters use `peftspec import`")
    for key in ("format_version", "spec", "base_digest"):
        if key not in meta:
            raise AdapterFileError(f"{path}: metadata lacks '{key}'")
    if meta["format_version"] != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format version {meta['format_version']} is not "
                               f"supported by peftspec {__version__} (expected "
                               f"{FORMAT_VERSION}); upgrade peftspec")
    return meta


def load_adapter(model: nn.Module, path: str | os.PathLike, *, name: str | None = None,
                 activate: bool | None = None, registry=None,
                 allow_nonfinite: bool = False, force: bool = False,
                 freeze: bool = True) -> nn.Module:
    """Re-create the adapter saved at ``path`` on ``model`` as adapter ``name``.

    The first adapter on a model becomes active; a further one is loaded beside
    it, inactive unless ``activate=True`` (switch with :func:`peftspec.use`).

    Raises:
        AdapterFileError: unreadable file, another base, missing or extra
            tensors, wrong shapes, non-finite values. The model is unchanged.
        AdapterTooLarge: its embedded spec would allocate more than the base or
            the memory available (unless ``force``); nothing is allocated.

    ``freeze``: apply the spec's ``[[freeze]]`` rules (the default: the base is
    stored as the adapter was trained against, e.g. nf4). ``False`` skips them
    and serves the adapter on the full-precision base. Which one happened is
    logged on the ``peftspec`` logger and readable afterwards with
    :func:`peftspec.core.packed.frozen_modules`.
    """
    name = name or DEFAULT_NAME
    previous = active_adapter(model)
    with base_view(model):
        plan = checked_plan(model, path, registry, freeze=freeze)
    holder: list = []
    with torch.random.fork_rng(devices=[]):  # applying must not move the caller's RNG
        apply_plan(plan, model, name=name, activate=True, registry=registry, force=force,
                   freeze_log=holder)
    try:
        _copy_tensors(model, Path(path), allow_nonfinite)
    except BaseException:
        remove(model, name)
        for frozen in holder:  # a failed load leaves the base's storage as it was too
            frozen.undo(model)
        if previous is not None:
            use(model, previous)
        raise
    for frozen in holder:
        frozen.commit()
    _log_freeze(path, plan, freeze)
    if previous is not None and not activate:
        use(model, previous)
    return model


def freeze_rules(path: str | os.PathLike, registry=None) -> list[str]:
    """The ``[[freeze]]`` rules of the adapter file's spec, one line each."""
    meta = read_metadata(path)
    spec = parse_spec(meta["spec"], file=f"{path} (embedded spec)", registry=registry)
    return [f"{r.where} {r.method} ({storage_options(r.options) or 'defaults'})"
            for r in spec.rules_of("freeze")]


def _log_freeze(path, plan, applied: bool) -> None:
    import logging

    rules = plan.spec.rules_of("freeze")
    if not rules and applied:
        return
    log = logging.getLogger("peftspec")
    if applied:
        log.info("%s: applied its [[freeze]] rules (%s) to %d module(s)", path,
                 ", ".join(r.method for r in rules), len(plan.frozen))
    else:
        log.info("%s: skipped its [[freeze]] rules; the base stays in full precision", path)


def checked_plan(model: nn.Module, path, registry, freeze: bool = True):
    """Read ``path``'s header and spec, check the base, compile: touches nothing.
    ``freeze=False`` drops the spec's ``[[freeze]]`` rules from the plan."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        spec = parse_spec(meta["spec"], file=f"{path} (embedded spec)", registry=registry)
    except SpecError as exc:
        raise AdapterFileError(f"{path}: its embedded spec does not load here:\n{exc}") from None
    if not freeze:
        spec = dataclasses.replace(spec, rules=tuple(r for r in spec.rules
                                                     if r.family != "freeze"))

    actual = fingerprint(model)
    if digest(actual) != meta["base_digest"]:
        detail = []
        if "base_fingerprint" in meta:
            try:
                detail = describe_difference(decode(meta["base_fingerprint"]), actual)
            except ValueError:  # a damaged fingerprint (BadText): said instead of the detail
                detail = ["(the file's base fingerprint is unreadable)"]
        raise AdapterFileError(f"{path}: this adapter was made for another base model:\n  " +
                               "\n  ".join(detail or ["tensor names or shapes differ"]))
    try:
        return compile_plan(spec, model, registry=registry)
    except SpecError as exc:
        raise AdapterFileError(f"{path}: its spec does not fit this model:\n{exc}") from None


def _copy_tensors(model: nn.Module, path: Path, allow_nonfinite: bool) -> None:
    targets = file_tensors(model)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(targets) - keys)
            extra = sorted(keys - set(targets))
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
                if extra:
                    parts.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:5])}")
                raise AdapterFileError(f"{path}: tensors do not match the spec: " +
                                       "; ".join(parts))
            loaded = {}
            for name, param in targets.items():
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(param.shape):
                    raise AdapterFileError(f"{path}: tensor '{name}' has shape "
                                           f"{list(t.shape)}, the model expects "
                                           f"{list(param.shape)}")
                if t.is_floating_point() and not allow_nonfinite and \
                        not torch.isfinite(t).all():
                    raise AdapterFileError(f"{path}: tensor '{name}' holds NaN or Inf values "
                                           "(pass allow_nonfinite=True / --allow-nonfinite "
                                           "to load it anyway)")
                loaded[name] = t
    except (SafetensorError, OSError) as exc:
        raise AdapterFileError(f"{path}: cannot read tensors ({exc})") from None
    adapter_names = set(_module_hook(model, adapter_state, "adapter_state"))
    _module_hook(model, load_adapter_state, "load_adapter_state",
                 {k: v for k, v in loaded.items() if k in adapter_names})
    params = dict(model.named_parameters())
    buffers = adapter_buffers(model)
    with torch.no_grad():
        for name in loaded.keys() - adapter_names:
            (buffers[name][0] if name in buffers else params[name]).copy_(loaded[name])


def describe_file(path: str | os.PathLike) -> dict:
    """Metadata and tensor list of an adapter file (for ``peftspec inspect``)."""
    meta = read_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    return {"metadata": {k: v for k, v in meta.items() if k != "base_fingerprint"},
            "tensors": tensors}


__all__ = ["save_adapter", "load_adapter", "read_metadata", "atomic_write_bytes",
           "describe_file"]
