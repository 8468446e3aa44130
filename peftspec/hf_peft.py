"""HF PEFT's on-disk format, both ways (``peftspec export`` / ``peftspec import``).

HF PEFT saves an adapter as a folder: ``adapter_config.json`` (one config with
one ``peft_type``) and ``adapter_model.safetensors`` (tensors keyed
``base_model.model.<module path>.<name>``; soft prompts as
``prompt_embeddings``). A peftspec adapter is one file whose spec may hold
many rules. This module does what every method shares: reading both formats,
resolving which rule owns which module and tensor, ``[[train]]`` rules <->
``modules_to_save``, the task type, writing readable TOML, the checks, and
atomic writes. What a method's rules *mean* in HF PEFT's terms is the
method's business, so a third-party method can take part:

* export: ``Method.to_hf_peft(rules, context)`` gets all rules of that method
  as :class:`ExportRule` and returns ``context.part(peft_type, config,
  tensors)``, or ``None`` (the default) when HF PEFT has no counterpart;
* import: ``Method.hf_peft_types`` lists the ``peft_type`` values it reads,
  ``Method.from_hf_peft(config, context)`` returns ``context.imported(rules,
  tensors)``: TOML tables for the spec, and where each of its tensors comes
  from in HF PEFT's file.

:class:`ExportContext` and :class:`ImportContext` carry HF PEFT's matching
rules (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``rank_pattern``...) so plugins need not re-implement them. Whatever is
written is checked: an export is re-matched under HF PEFT's rules against the
module names; an import's spec is compiled against the base and every tensor
is checked by name and shape before anything is written. Errors are
:class:`~peftspec.errors.ConversionError` (exit code 2) naming the method,
option or tensor. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .adapter_file import (_checked_plan, atomic_write_bytes, file_tensors, read_metadata,
                           save_adapter)
from .errors import AdapterFileError, ConversionError, SpecError
from .fingerprint import decode
from .matching import class_names, parse_selector
from .method import adapter_state, load_adapter_state
from .options import selector_fields
from .patching import active_adapter, apply_plan, base_view, remove, use
from .plan import compile_plan
from .safetensors_io import serialize
from .spec import Rule, parse_spec

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")


def _refuse(message: str) -> NoReturn:
    raise ConversionError(message)


# --- HF PEFT's matching rules (peft 0.21, tuners_utils.check_target_module_exists) -------

def _layer_index(key: str, layers_pattern) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m:
                break
    return int(m.group("idx")) if m else None


def _hf_wrapped(modules_to_save, key: str) -> bool:
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save or ())


def hf_selects(config: dict, key: str) -> bool:
    """Whether HF PEFT adapts module ``key`` under ``config`` (its target rules)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if _hf_wrapped(config.get("modules_to_save"), key):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
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
        if re.match(rf"(.*\.)?({k})$", key):
            return k
    return None


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[-k:]) for k in range(1, len(parts) + 1)]


# --- export ------------------------------------------------------------------------------

@dataclass
class ExportRule:
    """One rule of the adapter's spec, as a method's ``to_hf_peft`` sees it.

    Attributes:
        rule: the spec's rule (``rule.where`` names it in messages).
        options: its options, as compiled.
        targets: module path (parameter name for ``[[train]]``; ``""`` for a
            soft prompt) -> the base module's class name, in model order.
        roles: target -> the selector options that picked it (IA3's
            ``feedforward``).
    """

    rule: Rule
    options: Any
    targets: dict[str, str] = field(default_factory=dict)
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _used: set[str] = field(default_factory=set, repr=False)

    def tensor(self, name: str) -> torch.Tensor:
        """The adapter file's tensor ``name`` (peftspec's name); marks it exported."""
        if name not in self._tensors:
            _refuse(f"the adapter file has no tensor '{name}', which {self.rule.where} "
                    f"({self.rule.method}) needs")
        self._used.add(name)
        return self._tensors[name]


@dataclass
class HFPeftPart:
    """What a method's rules become: the config's fields and HF-named tensors."""

    peft_type: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class ExportContext:
    """What ``to_hf_peft`` may use besides its rules.

    ``model`` is the base model when the user gave one (``--model``), else
    ``None``; ``module_names`` are the base's module names either way (from
    the adapter file's fingerprint without a model).
    """

    def __init__(self, model: nn.Module | None, modules: dict[str, nn.Module],
                 module_names: list[str], base_model_name_or_path: str | None):
        self.model = model
        self.module_names = module_names
        self.base_model_name_or_path = base_model_name_or_path
        self._modules = modules

    refuse = staticmethod(_refuse)

    @staticmethod
    def key(name: str) -> str:
        """HF PEFT's tensor name for peftspec's ``name`` (``base_model.model.`` + name)."""
        return PREFIX + name

    def module(self, path: str) -> nn.Module | None:
        """The base module at ``path`` (``None`` without a model)."""
        return self._modules.get(path)

    @staticmethod
    def part(peft_type: str, config: dict[str, Any],
             tensors: dict[str, torch.Tensor]) -> HFPeftPart:
        return HFPeftPart(peft_type, dict(config), dict(tensors))

    def shortest_suffixes(self, members: Iterable[str], ok: Callable[[str], bool]) -> list[str]:
        """For each member, its shortest dotted suffix ``s`` with ``ok(s)``
        (the full name when none is); de-duplicated, in order."""
        out: dict[str, None] = {}
        for name in members:
            pick = next((s for s in _suffixes(name) if ok(s)), name)
            out.setdefault(pick)
        return list(out)

    def target_modules(self, targets: Iterable[str]) -> list[str]:
        """A ``target_modules`` list that selects exactly ``targets`` under HF
        PEFT's rule (a name equal to an entry or ending in ``.entry``): the
        shortest suffixes that pick no other module, e.g. ``["q_proj", "v_proj"]``."""
        targets = list(targets)
        want = set(targets)

        def ok(s: str) -> bool:
            return all(n in want for n in self.module_names if n == s or n.endswith("." + s))

        keys = self.shortest_suffixes(targets, ok)
        picked = {n for n in self.module_names if hf_selects({"target_modules": keys}, n)}
        return keys if picked == want else targets

    def pattern(self, values: dict[str, Any], default: Any) -> dict[str, Any]:
        """``rank_pattern``-style keys giving each module (of ``values``) its
        value, ``default`` elsewhere; the shortest suffixes that are unambiguous."""
        out: dict[str, Any] = {}
        for name, value in values.items():
            if value == default:
                continue

            def ok(s: str, value=value) -> bool:
                return all(v == value for n, v in values.items() if re.match(rf"(.*\.)?({s})$", n))

            key = self.shortest_suffixes([name], ok)[0]
            out.setdefault(key, value)

        def check(pat: dict[str, Any]) -> bool:
            return all(pat.get(hf_pattern_key(pat, n), default) == v for n, v in values.items())

        if not check(out):
            out = {re.escape(n): v for n, v in values.items() if v != default}
        return out


def _task_type(model: nn.Module | None, fp_names: set[str]) -> str | None:
    if model is not None:
        cfg = getattr(model, "config", None)
        if getattr(cfg, "is_encoder_decoder", False):
            return "SEQ_2_SEQ_LM"
        name = type(model).__name__
        for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                             ("ForSequenceClassification", "SEQ_CLS"),
                             ("ForTokenClassification", "TOKEN_CLS"),
                             ("ForQuestionAnswering", "QUESTION_ANS")):
            if name.endswith(suffix):
                return task
        if callable(getattr(model, "generate", None)) and hasattr(model, "lm_head"):
            return "CAUSAL_LM"
        return None
    return "CAUSAL_LM" if "lm_head.weight" in fp_names else None


def _steps_without_model(spec, meta: dict, fp: list | None, file_names: set[str], registry):
    """(rule, target, roles, class name) for every step, from the adapter's metadata:
    the selectors re-resolved against the targets it records."""
    raw = meta.get("targets")
    if raw is None:
        _refuse("the adapter file does not record its targets (written by an older "
                "peftspec); pass --model so the spec can be resolved against the base")
    targets: dict[str, str] = json.loads(raw)
    steps, claimed = [], set()
    for rule in spec.rules:
        method = registry.method(rule.method)
        if rule.family == "prefix":
            steps.append((rule, "", ("model",), targets.get("", "")))
            continue
        if rule.family == "train":
            if fp is None:
                _refuse(f"{rule.where}: the adapter file has no base fingerprint to resolve "
                        "[[train]] selectors against; pass --model")
            names = [n for n, _, _ in fp if n in file_names]
            pool = {n: frozenset() for n in names}
        else:
            pool = {t: frozenset({c}) for t, c in targets.items() if t}
        chosen: dict[str, list[str]] = {}
        sels = [(f.name, s) for f in selector_fields(method.Options)
                for s in getattr(rule.options, f.name)]
        for key, text in sels + [("exclude", s) for s in rule.exclude]:
            if text.startswith("type:") and rule.family == "train":
                _refuse(f"{rule.where}: selector '{text}' needs the model's classes; pass --model")
            sel = parse_selector(text)
            for n, types in pool.items():
                if sel.matches(n, types):
                    chosen.setdefault(n, []).append(key)
        for n in pool:
            roles = chosen.get(n, [])
            if roles and "exclude" not in roles:
                steps.append((rule, n, tuple(roles), targets.get(n, "")))
                claimed.add(n)
    unclaimed = [t for t in targets if t and t not in claimed]
    if unclaimed:
        _refuse(f"cannot tell which rule adapted '{unclaimed[0]}' from the file alone; "
                "pass --model")
    return steps


def export_hf_peft(adapter: str | Path, out_dir: str | Path, *,
                   model: nn.Module | str | None = None, task_type: str | None = "auto",
                   registry=None) -> Path:
    """Write the peftspec adapter file ``adapter`` as an HF PEFT adapter folder.

    Args:
        model: the base (a module or a ``--model`` string); optional. With it the
            file is checked against the base and the config gets the model's
            geometry; ``hf:PATH`` also sets ``base_model_name_or_path``.
        task_type: HF PEFT's ``task_type``; ``"auto"`` guesses it from the model
            (``CAUSAL_LM`` for causal LMs), ``None`` leaves it null.

    Returns ``out_dir``, holding ``adapter_config.json`` and
    ``adapter_model.safetensors``. Raises :class:`ConversionError` (exit 2)
    for what HF PEFT cannot express, naming the rule and option.
    """
    from .plugins import get_registry

    registry = registry or get_registry()
    adapter, out_dir = Path(adapter), Path(out_dir)
    meta = read_metadata(adapter)
    base_name = None
    if isinstance(model, str):
        base_name = model[3:] if model.startswith("hf:") else None
        model = registry.load_model(model)
    try:
        spec = parse_spec(meta["spec"], file=f"{adapter} (embedded spec)", registry=registry)
    except SpecError as exc:
        raise AdapterFileError(f"{adapter}: its embedded spec does not load here:\n{exc}") \
            from None
    tensors = _read_tensors(adapter)
    fp = decode(meta["base_fingerprint"]) if "base_fingerprint" in meta else None
    fp_names = {n for n, _, _ in fp} if fp else set()

    if model is not None:
        with base_view(model):  # a patched model: its base modules
            plan = _checked_plan(model, adapter, registry)
            modules = dict(model.named_modules())
            params = {n for n, _ in model.named_parameters()}
        rules = {r.where: r for r in spec.rules}
        steps = [(rules[s.rule], s.target, s.roles, type(modules[s.target]).__name__)
                 for s in plan.steps if s.family != "train"]
        steps += [(rules[s.rule], s.target, s.roles, "") for s in plan.steps
                  if s.family == "train"]
        options = plan.options
        module_names = [n for n in modules if n]
    else:
        steps = _steps_without_model(spec, meta, fp, set(tensors), registry)
        options, modules = {}, {}
        module_names = sorted({n.rsplit(".", k)[0] for n in fp_names
                               for k in range(1, n.count(".") + 1)}) if fp else \
            sorted(t for t in json.loads(meta.get("targets", "{}")) if t)
        params = fp_names

    by_rule: dict[str, ExportRule] = {}
    used: set[str] = set()
    for rule, target, roles, cls in steps:
        er = by_rule.setdefault(rule.where, ExportRule(
            rule, options.get(rule.where, rule.options), _tensors=tensors, _used=used))
        er.targets[target] = cls
        er.roles[target] = tuple(roles)
    ctx = ExportContext(model, modules, module_names, base_name)

    parts: list[tuple[str, list[ExportRule], HFPeftPart]] = []
    trained: list[ExportRule] = []
    for name in dict.fromkeys(r.method for r in spec.rules):
        mine = [by_rule[r.where] for r in spec.rules if r.method == name and r.where in by_rule]
        if not mine:
            continue
        method = registry.method(name)
        if method.family == "train":
            trained += mine
            continue
        part = method.to_hf_peft(mine, ctx)
        if part is None:
            where = ", ".join(f"{r.rule.where} (line {r.rule.line})" for r in mine)
            _refuse(f"cannot export: method '{name}' ({where}) has no HF PEFT counterpart; "
                    "HF PEFT can express lora, ia3, prompt-tuning, p-tuning and "
                    "prefix-tuning (and [[train]] rules of whole modules)")
        parts.append((name, mine, part))
    if not parts:
        _refuse("cannot export: HF PEFT needs a PEFT method (LoRA, IA3, a soft prompt); "
                "this spec only has [[train]] rules")
    if len({p.peft_type for _, _, p in parts}) > 1:
        what = "; ".join(f"'{n}' ({', '.join(r.rule.where for r in rs)}) -> {p.peft_type}"
                         for n, rs, p in parts)
        _refuse(f"cannot export: an HF PEFT adapter has one peft_type, and this spec mixes "
                f"methods: {what}. Split the spec, one method per adapter")
    if len(parts) > 1:
        _refuse("cannot export: methods " + ", ".join(repr(n) for n, _, _ in parts) +
                " both map to HF PEFT's " + parts[0][2].peft_type + "; merge them into one")
    _, main_rules, part = parts[0]
    config = dict(part.config)
    out_tensors = dict(part.tensors)
    if trained:
        mts, extra = _modules_to_save(trained, params, module_names, main_rules)
        config["modules_to_save"] = mts
        out_tensors.update(extra)
    left = sorted(set(tensors) - used)
    if left:
        _refuse(f"cannot export: tensor '{left[0]}' of the adapter file belongs to no rule "
                f"that was exported ({len(left)} such tensor(s))")

    if task_type == "auto":
        task_type = _task_type(model, fp_names)
        if task_type is None and any(r.family == "prefix" for r in spec.rules):
            task_type = "CAUSAL_LM"
    elif task_type is not None and task_type not in TASK_TYPES:
        _refuse(f"unknown task type '{task_type}'; HF PEFT's are {', '.join(TASK_TYPES)}")
    full = {"peft_type": part.peft_type, "task_type": task_type,
            "base_model_name_or_path": base_name, "revision": None, "inference_mode": True,
            "modules_to_save": None, **config}
    full = dict(sorted(full.items()))
    data = serialize(out_tensors, {"format": "pt"})
    if out_dir.exists() and not out_dir.is_dir():
        _refuse(f"{out_dir} exists and is not a folder")
    atomic_write_bytes(out_dir / WEIGHTS_FILE, data)
    atomic_write_bytes(out_dir / CONFIG_FILE, (json.dumps(full, indent=2) + "\n").encode())
    return out_dir


def _modules_to_save(trained: list[ExportRule], params: set[str], module_names: list[str],
                     main_rules: list[ExportRule]):
    """[[train]] rules as ``modules_to_save``: only whole modules can be."""
    names = {t: r for r in trained for t in r.targets}
    owners: dict[str, None] = {}
    for name, rule in names.items():
        owner = name.rpartition(".")[0]
        if not owner:
            _refuse(f"cannot export {rule.rule.where}: it trains '{name}', a parameter of the "
                    "model itself; HF PEFT's modules_to_save holds submodules")
        missing = sorted(p for p in params if p.startswith(owner + ".") and p not in names)
        if missing:
            _refuse(f"cannot export {rule.rule.where}: it trains '{name}' but not '{missing[0]}'"
                    f" of the same module '{owner}'; HF PEFT's modules_to_save trains whole "
                    "modules (there is no per-parameter selection such as BitFit's biases)")
        owners.setdefault(owner)
    chosen = [m for m in owners if not any(m.startswith(o + ".") for o in owners)]
    for m in chosen:
        clash = [n for n in module_names if n != m and n.endswith(m)]
        if clash:
            _refuse(f"cannot export: module '{m}' for modules_to_save would also match "
                    f"'{clash[0]}' under HF PEFT's suffix rule")
        for r in main_rules:
            for t in r.targets:
                if t and (t == m or t.startswith(m + ".") or m.startswith(t + ".")):
                    _refuse(f"cannot export: '{t}' ({r.rule.where}, {r.rule.method}) overlaps "
                            f"'{m}', which a [[train]] rule trains whole; HF PEFT does not "
                            "adapt modules inside modules_to_save")
    tensors = {}
    for r in trained:
        for t in r.targets:
            tensors[PREFIX + t] = r.tensor(t)
    return chosen, tensors


# --- import ------------------------------------------------------------------------------

@dataclass
class ImportedRule:
    """A rule of the spec an import writes: its section and its TOML keys, in order."""

    family: str
    table: dict[str, Any]
    comment: str | None = None


@dataclass
class HFPeftImport:
    """What a method's ``from_hf_peft`` returns.

    ``tensors`` maps each tensor peftspec's patched model holds (its adapter
    file name, e.g. ``model.layers.0.self_attn.q_proj.lora_A``) to the name of
    HF PEFT's tensor and a function converting it (``None``: as is); a
    converter raises ``ValueError`` with the reason when the tensor is wrong.
    """

    rules: list[ImportedRule]
    tensors: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]]


class ImportContext:
    """What ``from_hf_peft`` may use: the base ``model``, the HF file's tensor
    ``shapes``, and HF PEFT's matching rules over the model's module names."""

    def __init__(self, config: dict, model: nn.Module, shapes: dict[str, tuple[int, ...]]):
        self.config = config
        self.model = model
        self.shapes = shapes
        self.modules = {n: m for n, m in model.named_modules() if n}
        self._types = {n: class_names(m) for n, m in self.modules.items()}
        self._hit_cache: dict[str, frozenset[str]] = {}

    refuse = staticmethod(_refuse)
    key = staticmethod(ExportContext.key)

    @staticmethod
    def rule(family: str, table: dict[str, Any], comment: str | None = None) -> ImportedRule:
        return ImportedRule(family, dict(table), comment)

    @staticmethod
    def imported(rules: list[ImportedRule], tensors: dict) -> HFPeftImport:
        return HFPeftImport(list(rules), dict(tensors))

    def require(self, defaults: dict[str, tuple]) -> None:
        """Refuse config fields set to a value outside the accepted ones."""
        for name, accepted in defaults.items():
            value = self.config.get(name, accepted[0])
            if value not in accepted:
                _refuse(f"cannot import: {CONFIG_FILE} sets {name} = {json.dumps(value)}, "
                        f"which peftspec cannot express (accepted: "
                        f"{', '.join(json.dumps(a) for a in accepted)})")

    _KINDS: dict[str, Callable[[Any], bool]] = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        and math.isfinite(v),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "null": lambda v: v is None,
        "str-list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "int-list": lambda v: isinstance(v, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v),
        "number-dict": lambda v: isinstance(v, dict) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()),
    }

    def get(self, name: str, kinds: str, default: Any = None) -> Any:
        """``config[name]`` (``default`` when absent), refused unless one of
        ``kinds`` (``"int|null"``, ``"str|str-list"``, ``"number-dict"``...)."""
        value = self.config.get(name, default)
        if not any(self._KINDS[k](value) for k in kinds.split("|")):
            _refuse(f"cannot import: {CONFIG_FILE} has {name} = {json.dumps(value)}; expected "
                    f"{kinds.replace('|', ' or ').replace('-', ' ')}")
        return value

    def targets(self) -> list[str]:
        """The modules HF PEFT adapts under this config, in model order."""
        for name, kinds in (("target_modules", "str|str-list|null"),
                            ("exclude_modules", "str|str-list|null"),
                            ("modules_to_save", "str-list|null"),
                            ("layers_to_transform", "int|int-list|null"),
                            ("layers_pattern", "str|str-list|null")):
            self.get(name, kinds)
        try:
            return [n for n in self.modules if hf_selects(self.config, n)]
        except re.error as exc:
            _refuse(f"cannot import: a module pattern in {CONFIG_FILE} is not a valid regular "
                    f"expression ({exc})")

    @staticmethod
    def pattern_key(patterns: dict | None, name: str) -> str | None:
        """The ``rank_pattern``-style key HF PEFT applies to module ``name``, if any."""
        return hf_pattern_key(patterns or {}, name)

    # selectors -------------------------------------------------------------------------

    def hits(self, selector: str) -> frozenset[str]:
        """The module names ``selector`` picks in the base model."""
        if selector not in self._hit_cache:
            sel = parse_selector(selector)
            self._hit_cache[selector] = frozenset(
                n for n in self.modules if sel.matches(n, self._types[n]))
        return self._hit_cache[selector]

    @staticmethod
    def name_selectors(names) -> list[str]:
        """HF PEFT's ``target_modules``-style value as selectors: a list entry
        ``q_proj`` picks ``q_proj`` and ``*.q_proj`` (``**.q_proj``); a string is
        a regular expression over the whole name (``re:``)."""
        if names is None:
            return []
        if isinstance(names, str):
            return [f"re:{names}"]
        return [f"**.{n}" if re.fullmatch(r"[\w.\-]+", n) else f"re:(.*\\.)?{re.escape(n)}"
                for n in sorted(names)]  # HF PEFT saves a set: its order means nothing

    @staticmethod
    def pattern_selector(key: str) -> str:
        """A ``rank_pattern`` key (HF matches ``(.*\\.)?(key)$``) as a selector."""
        if re.fullmatch(r"[\w\-]+(\.[\w\-]+)*", key):
            return f"**.{key}"
        return f"re:(.*\\.)?({key})"

    def base_candidates(self) -> list[tuple[list[str], list[str]]]:
        """(modules, exclude) candidates for the config's whole target set."""
        cfg = self.config
        targets = cfg.get("target_modules")
        exclude = self.name_selectors(cfg.get("exclude_modules"))
        layers = cfg.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        if not layers or isinstance(targets, str):
            return [(self.name_selectors(targets), exclude)]
        targets = sorted(targets)
        pattern = cfg.get("layers_pattern")
        if pattern:
            stacks = [pattern] if isinstance(pattern, str) else list(pattern)
        else:
            stacks = sorted({m.group(1) for n in self.targets()
                             if (m := re.match(r".*?\.([^.]*)\.\d+\.", n))})
        out = []
        globs = [f"**.{s}.{i}.**.{t}" for s in stacks for i in layers for t in targets]
        if len(globs) <= 12:
            out.append((globs, exclude))
        alt = "|".join
        out.append(([f"re:(.*\\.)?({alt(map(re.escape, stacks))})\\.({alt(map(str, layers))})"
                     f"\\.(.*\\.)?({alt(map(re.escape, targets))})"], exclude))
        return out

    def selectors(self, members: Iterable[str], candidates=(), *,
                  allow_exclude: bool = True) -> tuple[list[str], list[str]]:
        """``(modules, exclude)`` selectors picking exactly ``members``.

        Tries the ``(modules, exclude)`` candidates in order (dropping
        selectors that match nothing, which a spec may not have), then leaf
        names (``**.q_proj``), then the members' paths; returns the first that
        picks exactly the members.
        """
        members = list(members)
        want = set(members)
        leaves = list(dict.fromkeys(f"**.{n.rsplit('.', 1)[-1]}" for n in members))
        suffixes = list(dict.fromkeys(
            next((f"**.{s}" for s in _suffixes(n) if self.hits(f"**.{s}") <= want), n)
            for n in members if re.fullmatch(r"[\w.\-]+", n)))
        candidates = list(candidates)
        ordered = [c for c in candidates if not c[1]] + [(leaves, [])] + \
            ([c for c in candidates if c[1]] if allow_exclude else []) + [(suffixes, [])]
        for modules, exclude in ordered:
            modules = [s for s in dict.fromkeys(modules) if self._ok(s) and self.hits(s)]
            picked = set().union(*(self.hits(s) for s in modules)) if modules else set()
            exclude = [s for s in dict.fromkeys(exclude)
                       if self._ok(s) and self.hits(s) & picked]
            gone = set().union(*(self.hits(s) for s in exclude)) if exclude else set()
            modules = [s for s in modules if self.hits(s) - gone]  # wholly excluded: drop
            picked = set().union(*(self.hits(s) for s in modules)) if modules else set()
            exclude = [s for s in exclude if self.hits(s) & picked]
            picked -= gone
            if modules and picked == want:
                return modules, exclude
        return [n if re.fullmatch(r"[\w.\-]+", n) else f"re:{re.escape(n)}"
                for n in members], []

    @staticmethod
    def _ok(selector: str) -> bool:
        try:
            parse_selector(selector)
        except ValueError:
            return False
        return True


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from None


def read_hf_adapter(src: str | Path) -> tuple[dict, Path]:
    """``adapter_config.json`` of an HF PEFT folder, checked, and its weights' path."""
    src = Path(src)
    if not src.is_dir():
        _refuse(f"{src}: not a folder; an HF PEFT adapter is a folder with {CONFIG_FILE} "
                f"and {WEIGHTS_FILE}")
    cfg_path, weights = src / CONFIG_FILE, src / WEIGHTS_FILE
    if not cfg_path.is_file():
        _refuse(f"{src}: no {CONFIG_FILE} here, so this is not an HF PEFT adapter folder")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _refuse(f"{cfg_path}: not readable JSON ({exc})")
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        _refuse(f"{cfg_path}: has no 'peft_type' string; not an HF PEFT adapter config")
    if not weights.is_file():
        pickles = [p for p in PICKLES if (src / p).is_file()]
        if pickles:
            _refuse(f"{src}: has only {pickles[0]}, a pickle; peftspec never unpickles (it can "
                    "run code). Re-save it as safetensors where you trust it: "
                    "PeftModel.from_pretrained(base, DIR).save_pretrained(DIR2, "
                    "safe_serialization=True)")
        _refuse(f"{src}: no {WEIGHTS_FILE} here")
    return config, weights


def _method_for(peft_type: str, registry):
    found = [info.method for info in registry.methods.values()
             if peft_type in getattr(info.method, "hf_peft_types", ())]
    if not found:
        known = sorted(f"{t} ({i.method.name})" for i in registry.methods.values()
                       for t in getattr(i.method, "hf_peft_types", ()))
        _refuse(f"cannot import: unknown peft_type '{peft_type}': no installed method reads "
                f"it (readable: {', '.join(known) or 'none'})")
    return found[0]


def import_hf_peft(src: str | Path, out: str | Path, spec_out: str | Path | None = None, *,
                   model: nn.Module | str | None = None, registry=None) -> tuple[Path, Path]:
    """Convert the HF PEFT adapter folder ``src`` into a peftspec adapter file.

    Writes ``out`` (the adapter) and ``spec_out`` (a readable TOML spec,
    default ``out`` with suffix ``.toml``), both atomically and only after
    every check passed. ``model`` is the base (a module, left unchanged, or a
    ``--model`` string); by default ``base_model_name_or_path`` of the config
    when it is a local transformers folder.
    """
    from .plugins import get_registry

    registry = registry or get_registry()
    src, out = Path(src), Path(out)
    spec_out = Path(spec_out) if spec_out is not None else out.with_suffix(".toml")
    config, weights = read_hf_adapter(src)
    peft_type = config["peft_type"]
    method = _method_for(peft_type, registry)
    hf_tensors = _read_tensors(weights)
    if model is None:
        base = config.get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            _refuse(f"cannot import: need the base model; base_model_name_or_path is "
                    f"{json.dumps(base)}, not a local transformers folder: pass --model")
        model = f"hf:{base}"
    if isinstance(model, str):
        model = registry.load_model(model)

    with base_view(model):  # a model carrying adapters already: read its base
        ctx = ImportContext(config, model, {k: tuple(v.shape) for k, v in hf_tensors.items()})
        try:
            result = method.from_hf_peft(config, ctx)
        except re.error as exc:
            _refuse(f"cannot import: a pattern in {CONFIG_FILE} is not a valid regular "
                    f"expression ({exc})")
        rules, mapping = list(result.rules), dict(result.tensors)
        if config.get("modules_to_save"):
            rules.append(_train_rule(ctx, ctx.get("modules_to_save", "str|str-list"), mapping))
        wanted = {hf for hf, _ in mapping.values()}
        _drop_base_copies(hf_tensors, wanted, model)
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
        _refuse(f"cannot import: {weights.name} lacks tensor '{missing[0]}', which "
                f"{CONFIG_FILE} implies ({len(missing)} missing)")
    if extra:
        _refuse(f"cannot import: tensor '{extra[0]}' in {weights.name} does not match "
                f"{CONFIG_FILE} (no module it configures holds it; {len(extra)} such)")
    converted = {}
    for ours, (hf, convert) in mapping.items():
        t = hf_tensors[hf]
        try:
            t = convert(t) if convert else t
        except ValueError as exc:
            _refuse(f"cannot import: tensor '{hf}': {exc}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            _refuse(f"cannot import: tensor '{hf}' holds NaN or Inf values")
        converted[ours] = t

    previous = active_adapter(model)
    name = "hf-peft-import"
    with torch.random.fork_rng(devices=[]):
        apply_plan(plan, model, name=name, activate=True, registry=registry)
    try:
        expected = file_tensors(model)
        if set(expected) != set(converted):  # pragma: no cover - a plugin's naming bug
            odd = sorted(set(expected) ^ set(converted))
            _refuse(f"cannot import: method '{method.name}' mapped tensors that its module "
                    f"does not hold (or missed some): {', '.join(odd[:5])}")
        for ours, target in expected.items():
            t = converted[ours]
            if tuple(t.shape) != tuple(target.shape):
                _refuse(f"cannot import: tensor '{mapping[ours][0]}' has shape {list(t.shape)}"
                        f", the model expects {list(target.shape)} for '{ours}'")
        in_state = set(adapter_state(model))
        load_adapter_state(model, {k: v for k, v in converted.items() if k in in_state})
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k in set(converted) - in_state:
                params[k].copy_(converted[k])
        save_adapter(model, out)
        atomic_write_bytes(spec_out, text.encode("utf-8"))
    finally:
        remove(model, name)
        if previous is not None:
            use(model, previous)
    return out, spec_out


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
            _refuse(f"cannot import: tensor '{name}' is a copy of the base weight '{ours}' "
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
        _refuse(f"cannot import: modules_to_save {json.dumps(saved)} names no module of this "
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


# --- writing a readable spec ---------------------------------------------------------------

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            _refuse(f"cannot write {value} in a spec")
        return repr(value)
    if isinstance(value, str):
        if "\\" in value and "'" not in value and "\n" not in value:
            return f"'{value}'"  # a literal string: regular expressions stay readable
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} in a spec")


def spec_text(src: Path, config: dict, rules: list[ImportedRule]) -> str:
    version = f", written by peft {config['peft_version']}" if config.get("peft_version") else ""
    lines = [f"# Imported by `peftspec import` from the HF PEFT adapter {src.name}/",
             f"# (peft_type {config['peft_type']}{version}).", "",
             "[spec]", f"name = {toml_value(src.name)}",
             f"description = {toml_value('imported from HF PEFT (' + config['peft_type'] + ')')}",
             ""]
    for rule in rules:
        if rule.comment:
            lines += [f"# {c}" for c in rule.comment.splitlines()]
        lines.append("[prefix]" if rule.family == "prefix" else f"[[{rule.family}]]")
        for k, v in rule.table.items():
            line = f"{k} = {toml_value(v)}"
            if len(line) > 99 and isinstance(v, (list, tuple)):
                line = f"{k} = [\n" + "".join(f"    {toml_value(x)},\n" for x in v) + "]"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


__all__ = ["ExportContext", "ExportRule", "HFPeftImport", "HFPeftPart", "ImportContext",
           "ImportedRule", "export_hf_peft", "hf_pattern_key", "hf_selects", "import_hf_peft",
           "read_hf_adapter"]
