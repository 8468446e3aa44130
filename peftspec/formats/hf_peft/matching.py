"""HF PEFT's rules for which modules a config adapts, re-implemented.

HF PEFT picks modules by ``target_modules`` / ``exclude_modules`` /
``layers_to_transform`` / ``layers_pattern`` / ``modules_to_save``, and gives
them per-module values by ``rank_pattern``-style keys; these functions follow
peft 0.21 (``tuners_utils.check_target_module_exists``). Export uses them to
check that the config it writes selects exactly the adapted modules, import to
find what an HF config adapts. (peftspec's own selectors are
:mod:`peftspec.core.matching`; this is HF PEFT's matching, not ours.)

The patterns come from configs written by anyone, so they are compiled with
RE2 (:mod:`peftspec.core.saferegex`): linear time whatever the config says; a
pattern RE2 cannot run (backreferences, lookaround) raises
:class:`~peftspec.core.saferegex.UnsafePattern`, which the importer reports.
"""

from __future__ import annotations

from typing import Iterable

from peftspec.core.saferegex import compile_pattern

_DEFAULT_LAYER = compile_pattern(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def _layer_index(key: str, layers_pattern) -> int | None:
    if not layers_pattern:
        idx = _DEFAULT_LAYER.group(key, "idx")
    else:
        idx = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            idx = compile_pattern(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.").group(key, "idx")
            if idx is not None:
                break
    return int(idx) if idx is not None else None


def _hf_wrapped(modules_to_save, key: str) -> bool:
    return any(compile_pattern(rf"(^|.*\.){m}($|\..*)").match(key) for m in modules_to_save or ())


def hf_selects(config: dict, key: str) -> bool:
    """Whether HF PEFT adapts module ``key`` under ``config`` (its target rules)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if compile_pattern(exclude).fullmatch(key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if _hf_wrapped(config.get("modules_to_save"), key):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return compile_pattern(targets).fullmatch(key)
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        idx = _layer_index(key, config.get("layers_pattern"))
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def hf_pattern_key(keys: Iterable[str], key: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key HF PEFT uses for ``key``, if any."""
    for k in keys:
        if compile_pattern(rf"(.*\.)?({k})$").match(key):
            return k
    return None


def dotted_suffixes(name: str) -> list[str]:
    """Every dotted suffix of ``name``, shortest first (``a.b.c`` -> ``c``, ``b.c``, ``a.b.c``):
    the names HF PEFT's ``target_modules`` strings are matched against."""
    parts = name.split(".")
    return [".".join(parts[-k:]) for k in range(1, len(parts) + 1)]
