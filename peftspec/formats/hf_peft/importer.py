"""HF PEFT -> peftspec: convert an HF PEFT folder into an adapter file and spec.

:func:`import_hf_peft` reads the folder (:mod:`.folder`), finds the installed
method that reads its ``peft_type``, lets it translate the config
(its codec's ``from_hf_peft``, :mod:`.codec`), adds ``modules_to_save`` as a
``[[train]]`` rule, and
writes a readable TOML spec (:mod:`.spec_writer`). Before anything is
written, the spec is compiled against the base and every tensor is checked
by name, shape and finiteness; the adapter is applied to the base only
briefly, to save it in peftspec's format, and the base is left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from peftspec.core.buffers import adapter_buffers
from peftspec.formats.adapter_file import MAX_FINGERPRINT_CHARS, file_tensors, save_adapter
from peftspec.core.atomicio import atomic_write_bytes, check_room
from peftspec.core.errors import ConversionError, SpecError
from peftspec.core.matching import parse_selector
from peftspec.core.method import adapter_state, load_adapter_state
from peftspec.core.patching import active_adapter, apply_plan, base_view, remove, use
from peftspec.core.plan import compile_plan
from peftspec.core.saferegex import UnsafePattern
from peftspec.core.spec import parse_spec
from peftspec.formats.hf_peft.folder import CONFIG_FILE, PREFIX, read_tensors, refuse, read_hf_adapter
from peftspec.formats.hf_peft.codec import HFPeftCodec, all_codecs, codec_reading
from peftspec.formats.hf_peft.import_context import ImportContext, ImportedRule
from peftspec.formats.hf_peft.spec_writer import spec_text
from peftspec.core.registry import registry_or_default


def _codec_for(peft_type: str, registry) -> HFPeftCodec:
    codec = codec_reading(registry, peft_type)
    if codec is None:
        known = sorted(f"{t} ({c.method})" for c in all_codecs(registry) for t in c.peft_types)
        refuse(f"cannot import: unknown peft_type '{peft_type}': no installed method reads "
                f"it (readable: {', '.join(known) or 'none'})")
    return codec


def import_hf_peft(src: str | Path, out: str | Path, spec_out: str | Path | None = None, *,
                   model: nn.Module | str | None = None, registry=None) -> tuple[Path, Path]:
    """Convert the HF PEFT adapter folder ``src`` into a peftspec adapter file.

    Writes ``out`` (the adapter) and ``spec_out`` (a readable TOML spec,
    default ``out`` with suffix ``.toml``), both atomically and only after
    every check passed. ``model`` is the base (a module, left unchanged, or a
    ``--model`` string); by default ``base_model_name_or_path`` of the config
    when it is a local transformers folder.
    """
    registry = registry_or_default(registry)
    src, out = Path(src), Path(out)
    spec_out = Path(spec_out) if spec_out is not None else out.with_suffix(".toml")
    config, weights = read_hf_adapter(src)
    peft_type = config["peft_type"]
    codec = _codec_for(peft_type, registry)
    hf_tensors = read_tensors(weights)
    if model is None:
        base = config.get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            refuse(f"cannot import: need the base model; base_model_name_or_path is "
                    f"{json.dumps(base)}, not a local transformers folder: pass --model")
        model = f"hf:{base}"
    if isinstance(model, str):
        model = registry.load_model(model)

    riders = _riders(config, peft_type, registry)
    shapes = {k: tuple(v.shape) for k, v in hf_tensors.items()}
    with base_view(model):  # a model carrying adapters already: read its base
        # the main method sees the riders' keys as unset; each rider reads its own
        ctx = ImportContext({**config, **{k: None for r in riders
                                          for k in r.beside_keys}}, model, shapes)
        contexts = [ctx]
        try:
            result = codec.from_hf_peft(ctx.config, ctx)
            rules, mapping = list(result.rules), dict(result.tensors)
            for rider in riders:
                contexts.append(ImportContext(config, model, shapes))
                extra = rider.from_hf_peft_beside(config, contexts[-1])
                rules += extra.rules
                mapping.update(extra.tensors)
        except UnsafePattern as exc:
            refuse(f"cannot import: a pattern in {CONFIG_FILE}: {exc}")
        if config.get("modules_to_save"):
            rules.append(_train_rule(ctx, ctx.get("modules_to_save", "str|str-list"), mapping))
        wanted = {hf for hf, _ in mapping.values()}
        _drop_base_copies(hf_tensors, wanted, model)
        for c in contexts:
            _drop_copies(hf_tensors, c.dropped)
    text = spec_text(src, config, rules)
    try:
        spec = parse_spec(text, file=str(spec_out), registry=registry)
    except SpecError as exc:
        raise ConversionError(f"cannot import: {CONFIG_FILE} holds values peftspec cannot "
                              f"use; the spec written from it does not load:\n{exc}") from None
    try:
        plan = compile_plan(spec, model, registry=registry)
    except SpecError as exc:
        raise ConversionError(f"cannot import {src}: its config does not fit this model:\n"
                              f"{exc}") from None

    missing = sorted(wanted - set(hf_tensors))
    extra = sorted(set(hf_tensors) - wanted)
    if missing:
        refuse(f"cannot import: {weights.name} lacks tensor '{missing[0]}', which "
                f"{CONFIG_FILE} implies ({len(missing)} missing)")
    if extra:
        refuse(f"cannot import: tensor '{extra[0]}' in {weights.name} does not match "
                f"{CONFIG_FILE} (no module it configures holds it; {len(extra)} such)")
    converted = {}
    for ours, (hf, convert) in mapping.items():
        t = hf_tensors[hf]
        try:
            t = convert(t) if convert else t
        except ValueError as exc:
            refuse(f"cannot import: tensor '{hf}': {exc}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            refuse(f"cannot import: tensor '{hf}' holds NaN or Inf values")
        converted[ours] = t

    previous = active_adapter(model)
    name = "hf-peft-import"
    with torch.random.fork_rng(devices=[]):
        apply_plan(plan, model, name=name, activate=True, registry=registry)
    try:
        own = adapter_buffers(model)  # apply's own buffers: kept as apply made them
        expected = {k: t for k, t in file_tensors(model).items() if k not in own}
        if set(expected) != set(converted):  # pragma: no cover - a plugin's naming bug
            odd = sorted(set(expected) ^ set(converted))
            refuse(f"cannot import: the codec of '{codec.method}' mapped tensors that its module "
                    f"does not hold (or missed some): {', '.join(odd[:5])}")
        for ours, target in expected.items():
            t = converted[ours]
            if tuple(t.shape) != tuple(target.shape):
                refuse(f"cannot import: tensor '{mapping[ours][0]}' has shape {list(t.shape)}"
                        f", the model expects {list(target.shape)} for '{ours}'")
        in_state = set(adapter_state(model))
        load_adapter_state(model, {k: v for k, v in converted.items() if k in in_state})
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k in set(converted) - in_state:
                params[k].copy_(converted[k])
        # both files, or neither: room for the two is checked before the first is written
        check_room(out, sum(t.numel() * t.element_size() for t in converted.values()) +
                   len(text.encode("utf-8")) + MAX_FINGERPRINT_CHARS)
        save_adapter(model, out)
        atomic_write_bytes(spec_out, text.encode("utf-8"))
    finally:
        remove(model, name)
        if previous is not None:
            use(model, previous)
    return out, spec_out


def _riders(config: dict, peft_type: str, registry) -> list[HFPeftCodec]:
    """Codecs whose rules ride along this config (``HFPeftCodec.beside_keys`` set
    in it, e.g. LoRA's ``trainable_token_indices``), one per key."""
    out: list[HFPeftCodec] = []
    for c in all_codecs(registry):
        if peft_type in c.beside_types and any(config.get(k) is not None for k in c.beside_keys):
            if not any(set(c.beside_keys) & set(o.beside_keys) for o in out):
                out.append(c)
    return out


def _drop_copies(hf_tensors: dict, dropped: dict[str, str]) -> None:
    """Drop the tensors a method named copies (``ImportContext.drop``), once checked."""
    for name, original in dropped.items():
        if name not in hf_tensors:
            continue
        a, b = hf_tensors[name], hf_tensors.get(original)
        if b is None or a.shape != b.shape or not torch.equal(a, b):
            refuse(f"cannot import: tensor '{name}' should be a copy of '{original}' (a "
                    "tied weight) but differs from it")
        del hf_tensors[name]


def _drop_base_copies(hf_tensors: dict, wanted: set, model: nn.Module) -> None:
    """HF PEFT saves the base's embedding tables beside embedding LoRA
    (``save_embedding_layers``): drop such copies when they equal this base's."""
    params = dict(model.named_parameters())
    for name in [n for n in hf_tensors if n not in wanted and ".base_layer." in n]:
        ours = name.removeprefix(PREFIX).replace(".base_layer.", ".")
        base = params.get(ours)
        if base is None:
            continue
        t = hf_tensors[name]
        if tuple(t.shape) != tuple(base.shape) or not torch.equal(t.to(base.dtype), base.detach()):
            refuse(f"cannot import: tensor '{name}' is a copy of the base weight '{ours}' "
                    "that differs from this base's (a resized vocabulary or a trained "
                    "table?); peftspec adapters do not carry base weights")
        del hf_tensors[name]


def _train_rule(ctx: ImportContext, saved: list, mapping: dict) -> ImportedRule:
    """HF PEFT's ``modules_to_save`` as a ``[[train]]`` rule of whole modules."""
    if isinstance(saved, str):
        saved = [saved]
    wrapped = [n for n in ctx.modules if any(n.endswith(m) for m in saved)]
    wrapped = [n for n in wrapped if not any(n.startswith(o + ".") for o in wrapped)]
    if not wrapped:
        refuse(f"cannot import: modules_to_save {json.dumps(saved)} names no module of this "
                "model")
    params = [n for n, _ in ctx.model.named_parameters()
              if any(n.startswith(m + ".") for m in wrapped)]
    for p in params:
        mapping[p] = (PREFIX + p, None)
    pool = [n for n, _ in ctx.model.named_parameters()]
    sels = [f"{m}.**" for m in wrapped]
    picked = {n for n in pool if any(parse_selector(s).matches(n) for s in sels)}
    return ImportedRule("train", {"params": sels if picked == set(params) else params},
                        "HF PEFT's modules_to_save: these modules are trained whole")
