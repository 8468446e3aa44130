"""``peftspec merge``: write base + adapter as one plain model, tensor by tensor.

For an ``hf:`` directory (and a ``gguf:`` file or ``smollm2``, through their
converted cache folder) the base is never loaded whole. The model is built on
the ``meta`` device (no memory), the adapter's spec is compiled against it,
and each output shard is written as the input shard is read: a tensor the
adapter does not touch is copied through; a module the adapter reparameterizes
is materialised alone (its tensors read from the shards), adapted with the
method's own ``apply``, loaded with the adapter's tensors and folded with its
own ``merge``; a tensor ``[[train]]`` trained takes the adapter's value. Keys,
dtypes, shapes and sharding stay the base's; the config and tokenizer files
are copied. Peak memory stays near one shard's header plus a few tensors,
never the model (compare HF PEFT, which loads the model, merges and saves).

For other model sources the model is built in memory, the adapter loaded and
merged, and the state dict written the same way. Output goes to a temporary
folder renamed into place at the end: a failure leaves ``out`` as it was.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from peftspec.core.atomicio import replace_dir, staging_dir, writing
from peftspec.core.capabilities import SharesRuleState
from peftspec.core.errors import AdapterFileError, NotMergeableError
from peftspec.core.method import load_adapter_state
from peftspec.core.packed import dequantized, thaw
from peftspec.core.patching import merge, refuse_tied
from peftspec.core.registry import registry_or_default
from peftspec.core.safetensors_io import (DTYPES, header_and_chunks, header_bytes, tensor_bytes,
                                          write_chunks)
from peftspec.core.spec import parse_spec
from peftspec.core.blame import reraise
from peftspec.formats.adapter_file import checked_plan, load_adapter, read_metadata
from peftspec.models.hf import config_and_class, hf_folder

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_ST_DTYPES = {v: k for k, v in DTYPES.items()}


ONTO = ("original", "dequantized")


def merge_to_dir(source: str | None, adapter: str | os.PathLike, out: str | os.PathLike, *,
                 skip_unmergeable: bool = False, allow_nonfinite: bool = False, registry=None,
                 progress: Callable[[int, int], None] | None = None,
                 onto: str = "original") -> dict:
    """Merge ``adapter`` into the model ``source`` names; write it to folder ``out``.

    For an adapter whose spec has ``[[freeze]]`` rules (trained on an nf4 /
    int8 / bf16 base), ``onto`` says which base weights it folds into:
    ``"original"`` (the checkpoint's own, full precision) or ``"dequantized"``
    (the checkpoint's weights quantized by the rules and dequantized again:
    the base the adapter was trained against; every frozen module is written
    so, adapted or not). Either way the output holds dense tensors of the
    checkpoint's dtypes: nothing is requantized.

    Returns a summary: tensors written, merged modules, shards, ``onto`` and
    the number of frozen modules the rules name.
    """
    if onto not in ONTO:
        raise ValueError(f"onto must be one of {ONTO}, got {onto!r}")
    registry = registry_or_default(registry)
    out = Path(out)
    # Built under a temporary name beside OUT and swapped in at once: a crash or a
    # full disk at any moment leaves the previous OUT as it was (peftspec.core.atomicio).
    folder = hf_folder(source)  # hf:PATH, or a gguf: file's cache folder
    in_memory_from = None
    if folder is not None and _prepares(Path(adapter), registry):
        # a rule's modules share state (SharesRuleState): merge in memory, and take
        # the folder's config and tokenizer files along as the streamed merge does
        in_memory_from, folder = folder, None
    needed = _output_bytes(folder) if folder is not None else None
    with writing(out, needed):
        tmp = staging_dir(out)
        try:
            if folder is not None:
                # a cache folder's manifest describes that folder, not the merged one
                skip = () if source.startswith("hf:") else ("manifest.json",)
                summary = _merge_hf(folder, Path(adapter), tmp, skip_unmergeable,
                                    registry, progress, allow_nonfinite, skip_files=skip,
                                    onto=onto)
            else:
                summary = _merge_in_memory(source, Path(adapter), tmp, skip_unmergeable,
                                           registry, allow_nonfinite, final=out, onto=onto)
                if in_memory_from is not None:
                    _copy_side_files(in_memory_from, tmp, source)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return summary


def _copy_side_files(folder: Path, out: Path, source: str) -> None:
    """The hf: folder's files other than its weights (config, tokenizer, generation
    config) into ``out``, beside the merged weights written in memory."""
    skip = () if source.startswith("hf:") else ("manifest.json",)
    for name in os.listdir(folder):
        src = folder / name
        if src.is_file() and not name.endswith((".safetensors", ".bin", ".safetensors.index.json",
                                               ".bin.index.json")) and name not in skip \
                and not (out / name).exists():
            shutil.copy2(src, out / name)


def _prepares(adapter: Path, registry) -> bool:
    """Whether a method of the adapter's spec shares state across a rule's modules
    (implements ``SharesRuleState.prepare``, as VeRA does): module-by-module streaming would
    adapt each module without the others, so such adapters are merged in memory."""

    try:
        spec = parse_spec(read_metadata(adapter)["spec"], registry=registry)
    except Exception:  # noqa: BLE001 - the streaming path reports a bad file itself
        return False
    return any(isinstance(registry.method(r.method), SharesRuleState) for r in spec.rules)


def _output_bytes(path: Path) -> int | None:
    """Bytes a streamed merge of the hf: folder ``path`` writes: its files less pickles
    (the shards keep their keys, dtypes and shapes, so their sizes)."""
    try:
        return sum(p.stat().st_size for p in path.iterdir()
                   if p.is_file() and not p.name.endswith(".bin"))
    except OSError:
        return None


def _mergeable_records(plan, registry, skip_unmergeable: bool):
    blocked = sorted({f"{s.method} ({s.rule})" for s in plan.steps
                      if s.family not in ("train", "freeze") and
                      not registry.method(s.method).mergeable})
    if blocked and not skip_unmergeable:
        raise NotMergeableError("cannot merge: " + ", ".join(blocked) + " add computation that "
                                "does not fold into base weights (pass --skip-unmergeable to "
                                "drop them)")
    return [s for s in plan.steps if s.family not in ("train", "freeze") and
            registry.method(s.method).mergeable]


def _meta_model(path: Path) -> nn.Module:
    _, config, cls = config_and_class(str(path))
    with torch.device("meta"):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else \
            cls.from_config(config)
    return model.eval()


def _shards(path: Path) -> tuple[list[str], dict | None]:
    if (path / INDEX).is_file():
        index = json.loads((path / INDEX).read_text())
        return sorted(set(index["weight_map"].values())), index
    if (path / WEIGHTS).is_file():
        return [WEIGHTS], None
    if any(path.glob("*.bin")):
        raise AdapterFileError(f"{path} holds only pickled weights (*.bin); peftspec never "
                               "unpickles: convert them to safetensors first")
    raise AdapterFileError(f"{path}: no {WEIGHTS} or {INDEX}")


def _merge_hf(path: Path, adapter: Path, out: Path, skip_unmergeable: bool, registry,
              progress, allow_nonfinite: bool = False, skip_files=(),
              onto: str = "original") -> dict:
    shard_names, _ = _shards(path)
    for shard in shard_names:  # every shard must be sound before anything is written
        ShardReader(path / shard).close()
    model = _meta_model(path)
    plan = checked_plan(model, adapter, registry)
    steps = _mergeable_records(plan, registry, skip_unmergeable)
    modules = dict(model.named_modules())
    refuse_tied(model, [(s, modules[s.target]) for s in steps])
    where: dict[str, str] = {}
    for shard in shard_names:
        with safe_open(str(path / shard), framework="pt") as f:
            for key in f.keys():
                where[key] = shard
    with safe_open(str(adapter), framework="pt") as f:
        adapter_tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, t in adapter_tensors.items():
        if t.is_floating_point() and not allow_nonfinite and not torch.isfinite(t).all():
            raise AdapterFileError(f"{adapter}: tensor '{key}' holds NaN or Inf values (pass "
                                   "--allow-nonfinite to merge it anyway)")

    owner: dict[str, str] = {}  # checkpoint key -> merged module path
    modules = dict(model.named_modules())
    by_path = {s.target: s for s in steps}
    for target in by_path:
        for local, _ in modules[target].named_parameters():
            owner[f"{target}.{local}"] = target
    trained = {s.target for s in plan.steps if s.family == "train"}
    freeze = {s.target: s for s in plan.steps if s.family == "freeze"}
    requant = {f"{t}.weight": s for t, s in freeze.items()
               if onto == "dequantized" and t not in by_path}  # frozen, not adapted
    missing = sorted(k for k in list(owner) + list(trained) if k not in where)
    if missing:
        raise AdapterFileError(f"{path}: the checkpoint has no tensor named {missing[0]!r} "
                               f"(and {len(missing) - 1} more): its keys are not the model's "
                               "state-dict names, so it cannot be merged tensor by tensor")

    readers = {shard: ShardReader(path / shard) for shard in shard_names}

    def fetch(key: str) -> torch.Tensor:
        return readers[where[key]].tensor(key)

    pending: dict[str, dict[str, torch.Tensor]] = {}  # path -> merged tensors not yet written
    total = len(where)
    done = 0
    merged_modules = 0
    try:
        for shard in shard_names:
            reader = readers[shard]
            keys = reader.keys()
            header = header_bytes([(k, reader.entries[k]["dtype"], reader.entries[k]["shape"])
                              for k in keys], reader.metadata)
            with open(out / shard, "wb") as w:
                w.write(header)
                for key in keys:
                    base_dtype = _ST_DTYPES[reader.entries[key]["dtype"]]
                    if key in owner:
                        target = owner[key]
                        if target not in pending:
                            pending[target] = _merge_module(
                                modules[target], by_path[target], fetch, adapter_tensors,
                                registry, freeze.get(target) if onto == "dequantized" else None,
                                plan.spec.file)
                            merged_modules += 1
                        t = pending[target].pop(key[len(target) + 1:])
                        if not pending[target]:
                            del pending[target]
                        w.write(tensor_bytes(t.to(base_dtype)))
                    elif key in trained:
                        w.write(tensor_bytes(adapter_tensors[key].to(base_dtype)))
                    elif key in requant:  # the base the adapter saw: quantized, dequantized
                        w.write(tensor_bytes(_roundtrip(fetch(key), requant[key], modules,
                                                registry).to(base_dtype)))
                    else:
                        reader.copy_to(key, w)  # bytes through, never decoded
                    done += 1
                    if progress:
                        progress(done, total)
                w.flush()
                os.fsync(w.fileno())
    finally:
        for reader in readers.values():
            reader.close()
    for name in os.listdir(path):
        src = path / name
        if src.is_file() and name not in shard_names and not name.endswith(".bin") and \
                name not in skip_files:
            shutil.copy2(src, out / name)
    return {"tensors": total, "merged_modules": merged_modules, "shards": len(shard_names),
            "onto": onto, "frozen_modules": len(freeze)}


def _roundtrip(t: torch.Tensor, step, modules, registry) -> torch.Tensor:
    """``t`` (a frozen module's weight) packed by its freeze step, dequantized again,
    in the dtype the model holds it in (as training quantized it)."""

    dtype = modules[step.target].weight.dtype  # the meta model's: what a loaded model has
    packed = registry.method(step.method).pack(t.to(dtype), step)
    return dequantized(packed)


class ShardReader:
    """Reads tensors from a safetensors file with plain reads, not a memory map,
    so a streamed merge holds one tensor at a time rather than the file's pages.
    (Opened with ``safe_open`` first, which validates the header.)"""

    CHUNK = 16 * 2**20

    def __init__(self, path: Path):
        import struct

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise AdapterFileError(f"{path}: not a readable safetensors file ({exc})") from None
        self.fd = os.open(path, os.O_RDONLY)
        n = struct.unpack("<Q", os.pread(self.fd, 8, 0))[0]
        header = json.loads(os.pread(self.fd, n, 8))
        self.metadata = header.pop("__metadata__", None)
        self.entries = header
        self.start = 8 + n

    def keys(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])

    def tensor(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        a, b = e["data_offsets"]
        buf = bytearray(os.pread(self.fd, b - a, self.start + a))
        dtype = _ST_DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])

    def copy_to(self, key: str, w) -> None:
        a, b = self.entries[key]["data_offsets"]
        pos = a
        while pos < b:
            n = min(self.CHUNK, b - pos)
            w.write(os.pread(self.fd, n, self.start + pos))
            pos += n

    def close(self) -> None:
        os.close(self.fd)


def _merge_module(meta_module: nn.Module, step, fetch, adapter_tensors, registry,
                  freeze=None, file: str | None = None):
    """Materialise one module from the shards, adapt, load, merge; its tensors.
    ``freeze``: the module's ``[[freeze]]`` step, to merge onto its weight as the
    adapter saw it (packed, then dequantized by the merge: never requantized).
    A plugin's exception is named with ``file``, the adapter's spec (core.blame)."""
    try:
        return _adapt_and_merge(meta_module, step, fetch, adapter_tensors, registry, freeze)
    except Exception as exc:  # noqa: BLE001
        hook = getattr(exc, "peftspec_hook", None)
        if hook is None:  # not a plugin's hook: peftspec's own error
            raise
        reraise(exc, registry, freeze if hook == "pack" else step, hook, file,
                target=step.target)


def _adapt_and_merge(meta_module, step, fetch, adapter_tensors, registry, freeze):
    fresh = copy.deepcopy(meta_module).to_empty(device="cpu")
    with torch.no_grad():
        for local, p in fresh.named_parameters():
            p.copy_(fetch(f"{step.target}.{local}"))
        for local, b in fresh.named_buffers():
            key = f"{step.target}.{local}"
            try:
                b.copy_(fetch(key))
            except KeyError:
                pass  # a non-persistent buffer: set by the module's own init
        if freeze is not None:
            packed = _hook("pack", registry.method(freeze.method).pack, fresh.weight.detach(),
                           freeze)
            fresh._parameters["weight"] = nn.Parameter(packed, requires_grad=False)
    method = registry.method(step.method)
    installed = _hook("apply", method.apply, fresh, step)
    prefix = step.target + "."
    mine = {k[len(prefix):]: v for k, v in adapter_tensors.items() if k.startswith(prefix)}
    _hook("load_adapter_state", load_adapter_state, installed, mine)
    with torch.no_grad():  # the persistent buffers the adapter added, as saved (core.buffers)
        for local, b in installed.named_buffers():
            if local in mine:
                b.copy_(mine[local])
    merged = _hook("merge", method.merge, installed, fresh)
    return {k: v.detach() for k, v in merged.named_parameters()}


def _hook(name: str, fn, *args):
    """``fn(*args)``, a plugin's hook: what it raises is tagged with the hook's name,
    for :func:`_merge_module` to name the plugin."""
    try:
        return fn(*args)
    except Exception as exc:
        exc.peftspec_hook = name
        raise


def _merge_in_memory(source, adapter: Path, out: Path, skip_unmergeable: bool,
                     registry, allow_nonfinite: bool = False, final: Path | None = None,
                     onto: str = "original") -> dict:

    model = registry.load_model(source)
    load_adapter(model, adapter, registry=registry, allow_nonfinite=allow_nonfinite,
                 freeze=onto == "dequantized")
    merged = merge(model, skip_unmergeable=skip_unmergeable)
    frozen = len(thaw(merged))  # dense tensors of the original dtype, for the file
    seen: set[int] = set()
    tensors = {}
    for name, t in merged.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # tied tensors are stored once, as transformers does
            seen.add(id(t))
            tensors[name] = t.detach()

    head, chunks = header_and_chunks(tensors, {"format": "pt"})
    needed = len(head) + sum(t.numel() * t.element_size() for t in tensors.values())
    with writing((final or out) / WEIGHTS, needed), open(out / WEIGHTS, "wb") as w:
        write_chunks(w, head, chunks)
        w.flush()
        os.fsync(w.fileno())
    return {"tensors": len(tensors), "merged_modules": None, "shards": 1, "onto": onto,
            "frozen_modules": frozen}
