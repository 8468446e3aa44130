"""Adapter arithmetic: combine LoRA adapters of one base into one adapter file.

:func:`combine` reads peftspec adapter files, checks that they can be
combined, combines each target module's update by one of the methods of
:mod:`peftspec.merging.combine_math` (``linear``, ``cat``, ``svd``, ``ties``,
``dare_linear``, ``dare_ties``), and writes an ordinary peftspec adapter file
(atomically) that ``load_adapter``, ``peftspec generate``, ``merge`` and
``export`` take like any other.

What can be combined, and what is refused (:class:`CombineError`, exit 2,
naming the file and the rule):

* **One base.** Every input's ``base_digest`` must be the same; with
  ``model`` each is also checked against that model.
* **LoRA only.** Every rule must be ``method = "lora"`` without DoRA (its
  magnitude vector is not a low-rank update and does not add) and with
  ``init`` ``"zeros"`` or ``"gaussian"`` (an initialisation that rewrites the
  base, such as PiSSA, makes each update relative to its own residual base).
  Bottleneck adapters, IA3, soft prompts and ``[[train]]`` rules are refused.
* **Targets: the union.** A module adapted by some inputs and not others is
  in the result; the inputs that lack it contribute a zero update there (they
  did not change that module). Each method is exact under this rule, as
  :mod:`peftspec.merging.combine_math` explains.

Every input's scale is folded exactly into the combination (``alpha/r``,
``alpha/sqrt(r)`` with rsLoRA, each rule its own). The result's spec has one
``lora`` rule per output rank, naming its modules literally, with
``alpha = r`` (scale 1: the scales already sit in ``B``), ``rslora = false``,
and the inputs' dropout where they all agree (else 0). Its metadata adds
``combine``: the method, weights, density, rank, seed and input file names.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from peftspec.core.version import __version__
from peftspec.formats.adapter_file import FORMAT, FORMAT_VERSION, checked_plan, read_metadata
from peftspec.core.atomicio import atomic_write_bytes
from peftspec.merging.combine_math import DENSE, METHODS, SIGN_METHODS, Term, combine_target
from peftspec.core.errors import ConversionError, PeftspecError, SpecError
from peftspec.core.fingerprint import decode
from peftspec.formats.hf_peft.exporter import steps_without_model
from peftspec.formats.hf_peft.folder import read_tensors
from peftspec.core.patching import base_view
from peftspec.core.safetensors_io import serialize
from peftspec.core.spec import parse_spec
from peftspec.core.untrusted import BadText
from peftspec.core.registry import registry_or_default
from peftspec.core.saferegex import escape
from peftspec.formats.hf_peft.spec_writer import toml_value

LORA_INITS = ("zeros", "gaussian")
_PLAIN_NAME = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class CombineError(PeftspecError):
    """Adapters that cannot be combined (another base, a method other than LoRA,
    bad weights or options)."""

    exit_code = 2


class _Input:
    """One input file: its metadata and, per target, (scale, A, B, class, rule)."""

    def __init__(self, path: Path, registry, model: nn.Module | None):
        self.path = path
        self.meta = read_metadata(path)
        try:
            spec = parse_spec(self.meta["spec"], file=f"{path} (embedded spec)",
                              registry=registry)
        except SpecError as exc:
            raise CombineError(f"{path}: its embedded spec does not load here:\n{exc}") from None
        self.spec = spec
        for rule in spec.rules:
            where = f"{path}: {rule.where} (line {rule.line} of its embedded spec)"
            if rule.method != "lora":
                raise CombineError(f"{where} is method '{rule.method}'; only LoRA adapters "
                                   "combine (their updates are low-rank matrices that add)")
            if getattr(rule.options, "dora", False):
                raise CombineError(f"{where} is DoRA; its magnitude vector rescales the "
                                   "weight and does not add, so DoRA adapters do not combine")
            init = getattr(rule.options, "init", "zeros")
            if init not in LORA_INITS:
                raise CombineError(f"{where} has init = {init!r}, which rewrites the base "
                                   "weights; its update is relative to its own residual base, "
                                   "so it does not combine with others")
        tensors = read_tensors(path)
        self.targets = self._targets(registry, model, tensors)
        self.terms: dict[str, tuple[float, torch.Tensor, torch.Tensor, str]] = {}
        expected = set()
        for target, (rule, cls) in self.targets.items():
            a_key, b_key = f"{target}.lora_A", f"{target}.lora_B"
            expected |= {a_key, b_key}
            if a_key not in tensors or b_key not in tensors:
                raise CombineError(f"{path}: {rule.where} adapts '{target}' but the file lacks "
                                   f"'{a_key}' or '{b_key}'")
            a, b = tensors[a_key], tensors[b_key]
            r = rule.options.r
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                raise CombineError(f"{path}: '{target}': lora_A {list(a.shape)} and lora_B "
                                   f"{list(b.shape)} do not have rank r = {r} of {rule.where}")
            for key, t in ((a_key, a), (b_key, b)):
                if not t.is_floating_point() or not torch.isfinite(t).all():
                    raise CombineError(f"{path}: tensor '{key}' is not finite floating point")
            self.terms[target] = (rule.options.scale, a, b, cls)
        extra = sorted(set(tensors) - expected)
        if extra:
            raise CombineError(f"{path}: tensors no LoRA rule owns: {', '.join(extra[:5])}")

    def _targets(self, registry, model, tensors) -> dict[str, tuple]:
        """target -> (rule, module class name): resolved against ``model`` when
        given, else from the targets the file records (as ``export`` does)."""
        if model is not None:
            with base_view(model):
                try:
                    plan = checked_plan(model, self.path, registry)
                except PeftspecError as exc:
                    raise CombineError(str(exc)) from None
                modules = dict(model.named_modules())
            rules = {r.where: r for r in self.spec.rules}
            return {s.target: (rules[s.rule], type(modules[s.target]).__name__)
                    for s in plan.steps}
        try:
            fp = decode(self.meta["base_fingerprint"]) if "base_fingerprint" in self.meta \
                else None
        except BadText as exc:
            raise CombineError(f"{self.path}: its 'base_fingerprint' metadata is damaged "
                               f"({exc})") from None
        try:
            steps = steps_without_model(self.spec, self.meta, fp, set(tensors), registry)
        except ConversionError as exc:
            raise CombineError(f"{self.path}: {exc}") from None
        return {target: (rule, cls) for rule, target, _, cls in steps}


def parse_weights(text: str, n: int) -> list[float]:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]``, exactly ``n`` finite numbers."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise CombineError(f"--weights {text!r}: expected comma-separated numbers, one per "
                           "adapter, e.g. 0.7,0.3") from None
    if len(weights) != n:
        raise CombineError(f"--weights {text!r} gives {len(weights)} weight(s) for {n} "
                           "adapter(s); give one per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise CombineError(f"--weights {text!r}: every weight must be finite")
    return weights


def _check_options(method, weights, n, density, rank, sign_method):
    if method not in METHODS:
        raise CombineError(f"unknown combine method {method!r}; expected one of "
                           f"{', '.join(METHODS)}")
    if n < 1:
        raise CombineError("combine needs at least one adapter file")
    if len(weights) != n:
        raise CombineError(f"{len(weights)} weight(s) for {n} adapter(s); give one per adapter")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise CombineError(f"weights {list(weights)}: every weight must be a finite number")
    if method in DENSE:
        if density is None:
            raise CombineError(f"--method {method} needs --density D (the fraction of each "
                               "update's entries kept, 0 < D <= 1)")
        if not 0 < density <= 1:
            raise CombineError(f"--density {density}: must be in (0, 1]")
    elif density is not None:
        raise CombineError(f"--density applies to ties, dare_linear and dare_ties, not {method}")
    if rank is not None:
        if method == "cat":
            raise CombineError("--rank does not apply to cat, whose rank is the inputs' sum; "
                               "use --method linear --rank R to truncate")
        if rank < 1:
            raise CombineError(f"--rank {rank}: must be at least 1")
    if sign_method not in SIGN_METHODS:
        raise CombineError(f"majority sign method {sign_method!r}: expected total or frequency")


def _selector(name: str) -> str:
    """A selector picking exactly the module ``name``."""

    if set(name) <= _PLAIN_NAME and not name.startswith(("re:", "type:")):
        return name  # a glob without wildcards matches that one name
    return "re:" + escape(name)


def _spec_text(groups: dict[int, list[str]], dropout: float, description: str) -> str:

    lines = ["# Written by `peftspec combine`: the inputs' scales are folded into lora_B,",
             "# so every rule has alpha = r (scale 1).", "", "[spec]",
             'name = "combined"', f"description = {toml_value(description)}", ""]
    for r in sorted(groups):
        lines += ["[[reparameterize]]", 'method = "lora"', "modules = ["]
        lines += [f"    {toml_value(_selector(t))}," for t in groups[r]]
        lines += ["]", f"r = {r}", f"alpha = {r}", f"dropout = {toml_value(float(dropout))}", ""]
    return "\n".join(lines)


def combine(adapters: Sequence[str | os.PathLike], weights: Sequence[float], *, method: str,
            out: str | os.PathLike, density: float | None = None, rank: int | None = None,
            seed: int = 0, majority_sign: str = "total", model: nn.Module | str | None = None,
            registry=None) -> dict:
    """Combine LoRA adapter files of one base into the adapter file ``out``.

    Args:
        adapters: peftspec adapter files (at least one).
        weights: one finite number per adapter (negative ones subtract).
        method: ``linear``, ``cat``, ``svd``, ``ties``, ``dare_linear`` or
            ``dare_ties``; :mod:`peftspec.merging.combine_math` defines each on the
            dense updates.
        density: the fraction kept by ``ties`` and the DARE methods (required
            there, refused elsewhere).
        rank: the output rank (not for ``cat``); default ``Σ rᵢ`` for
            ``linear`` (exact), the largest input rank otherwise; capped per
            module at ``min(out, in)``.
        seed: seeds the DARE masks (:func:`peftspec.merging.combine_math.dare_mask`).
        majority_sign: TIES's sign election, ``"total"`` or ``"frequency"``.
        model: the base (a module, left unchanged, or a ``--model`` string);
            optional: without it each file's rules are resolved from the
            targets it records, as ``peftspec export`` does.

    Returns a summary: ``out``, ``method``, ``targets``, ``params``, the ranks
    and the largest relative truncation error ``‖ΔW − B'A'‖/‖ΔW‖`` of any
    module. Raises :class:`CombineError` (exit 2) for what cannot combine,
    :class:`peftspec.AdapterFileError` for unreadable files; nothing is
    written then.
    """
    registry = registry_or_default(registry)
    paths = [Path(p) for p in adapters]
    weights = list(weights)
    _check_options(method, weights, len(paths), density, rank, majority_sign)
    if isinstance(model, str):
        model = registry.load_model(model)
    inputs = [_Input(p, registry, model) for p in paths]
    first = inputs[0]
    for other in inputs[1:]:
        if other.meta["base_digest"] != first.meta["base_digest"]:
            raise CombineError(f"{other.path} was made for another base model than "
                               f"{first.path} (base digest {other.meta['base_digest'][:12]}… "
                               f"vs {first.meta['base_digest'][:12]}…); only adapters of one "
                               "base combine")

    classes: dict[str, str] = {}
    for inp in inputs:
        for target, (_, _, _, cls) in inp.terms.items():
            if classes.setdefault(target, cls) != cls:
                raise CombineError(f"{inp.path}: '{target}' is a {cls} there and a "
                                   f"{classes[target]} in another input")
    if not classes:
        raise CombineError(f"{', '.join(map(str, paths))}: no module is adapted by any input "
                           "(every rule optional and matching nothing); nothing to combine")
    dtypes = {t.dtype for inp in inputs for _, a, b, _ in inp.terms.values() for t in (a, b)}
    out_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32

    tensors: dict[str, torch.Tensor] = {}
    groups: dict[int, list[str]] = {}
    worst = 0.0
    for target in sorted(classes):
        terms = [Term(i, float(weights[i]), scale, a, b)
                 for i, inp in enumerate(inputs) if target in inp.terms
                 for scale, a, b, _ in [inp.terms[target]]]
        shapes = {(tuple(t.A.shape[1:]), tuple(t.B.shape[:1])) for t in terms}
        if len(shapes) > 1:
            raise CombineError(f"'{target}': the inputs' LoRA factors disagree in shape "
                               f"({sorted(shapes)})")
        try:
            res = combine_target(terms, method, rank=rank, density=density, seed=seed,
                                 target=target, sign_method=majority_sign, out_dtype=out_dtype)
        except ValueError as exc:
            raise CombineError(f"'{target}': {exc}") from None
        tensors[f"{target}.lora_A"], tensors[f"{target}.lora_B"] = res.A, res.B
        groups.setdefault(res.A.shape[0], []).append(target)
        worst = max(worst, res.truncation)

    dropouts = {getattr(r.options, "dropout", 0.0) for inp in inputs for r in inp.spec.rules}
    dropout = dropouts.pop() if len(dropouts) == 1 else 0.0
    names = [p.name for p in paths]
    description = f"{method} of " + ", ".join(f"{n} ({w:g})" for n, w in zip(names, weights))
    text = _spec_text(groups, dropout, description)
    try:
        parse_spec(text, file="(combined spec)", registry=registry)
    except SpecError as exc:  # pragma: no cover - a bug here, not bad input
        raise PeftspecError(f"combine wrote a spec that does not load:\n{exc}") from None
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "peftspec_version": __version__,
        "spec": text, "base_digest": first.meta["base_digest"],
        "targets": json.dumps(classes, separators=(",", ":")),
        "combine": json.dumps({"method": method, "weights": weights, "density": density,
                               "rank": rank, "seed": seed, "majority_sign": majority_sign,
                               "inputs": names}, separators=(",", ":")),
    }
    fp = next((i.meta["base_fingerprint"] for i in inputs if "base_fingerprint" in i.meta), None)
    if fp is not None:
        header["base_fingerprint"] = fp
    out = Path(out)
    atomic_write_bytes(out, serialize(tensors, header))
    return {"out": str(out), "method": method, "inputs": [str(p) for p in paths],
            "weights": weights, "targets": len(classes),
            "params": sum(t.numel() for t in tensors.values()),
            "ranks": {str(r): len(ts) for r, ts in sorted(groups.items())},
            "max_truncation_error": worst}


__all__ = ["CombineError", "METHODS", "combine", "parse_weights"]
