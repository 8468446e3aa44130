"""peftspec -> HF PEFT: write a peftspec adapter file as an HF PEFT folder.

:func:`export_hf_peft` reads the adapter file and its embedded spec,
resolves which rule adapted which module (against the base model when given,
else from the targets and fingerprint the file records), hands each method's
rules to its codec's ``to_hf_peft`` (:mod:`.codec`), turns ``[[train]]`` rules into
``modules_to_save``, folds a method that rides along another's config into
it (trainable tokens as LoRA's ``trainable_token_indices``:
``HFPeftCodec.to_hf_peft_beside``), settles the task type, and writes
``adapter_config.json`` and ``adapter_model.safetensors`` atomically. It refuses (a
:class:`ConversionError`) what HF PEFT cannot express: methods without a
counterpart, mixed ``peft_type`` values, per-parameter training, tensors no
exported rule owns.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from peftspec.formats.adapter_file import checked_plan, read_metadata
from peftspec.core.atomicio import atomic_write_bytes, replace_dir, staging_dir, writing
from peftspec.core.errors import AdapterFileError, SpecError
from peftspec.core.fingerprint import decode
from peftspec.core.matching import parse_selector
from peftspec.core.options import selector_fields
from peftspec.core.patching import base_view
from peftspec.core.safetensors_io import serialize
from peftspec.core.spec import parse_spec
from peftspec.core.untrusted import BadText, json_loads
from peftspec.formats.hf_peft.codec import HFPeftCodec, codec_for
from peftspec.formats.hf_peft.export_context import ExportContext, ExportRule, HFPeftPart
from peftspec.formats.hf_peft.folder import CONFIG_FILE, PREFIX, TASK_TYPES, WEIGHTS_FILE, read_tensors, refuse
from peftspec.core.registry import registry_or_default


# Config keys that HF PEFT added later (the version in brackets), written only when set.
# exclude_modules [0.14]; modules_to_save on prompt-learning configs [0.14].
NEWER_KEYS = frozenset({"exclude_modules", "modules_to_save"})


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


def steps_without_model(spec, meta: dict, fp: list | None, file_names: set[str], registry):
    """(rule, target, roles, class name) for every step, from the adapter's metadata:
    the selectors re-resolved against the targets it records."""
    raw = meta.get("targets")
    if raw is None:
        refuse("the adapter file does not record its targets (written by an older "
                "peftspec); pass --model so the spec can be resolved against the base")
    try:
        targets: dict[str, str] = json_loads(raw)
    except BadText as exc:
        refuse(f"the adapter file's 'targets' metadata is not readable JSON ({exc})")
    if not isinstance(targets, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in targets.items()):
        refuse("the adapter file's 'targets' metadata is not a JSON object of strings")
    steps, claimed = [], set()
    for rule in spec.rules:
        method = registry.method(rule.method)
        if rule.family == "prefix":
            steps.append((rule, "", ("model",), targets.get("", "")))
            continue
        if rule.family == "train":
            if fp is None:
                refuse(f"{rule.where}: the adapter file has no base fingerprint to resolve "
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
                refuse(f"{rule.where}: selector '{text}' needs the model's classes; pass --model")
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
        refuse(f"cannot tell which rule adapted '{unclaimed[0]}' from the file alone; "
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
    registry = registry_or_default(registry)
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
    tensors = read_tensors(adapter)
    try:
        fp = decode(meta["base_fingerprint"]) if "base_fingerprint" in meta else None
    except BadText as exc:
        raise AdapterFileError(f"{adapter}: its 'base_fingerprint' metadata is damaged ({exc})") \
            from None
    fp_names = {n for n, _, _ in fp} if fp else set()

    if model is not None:
        with base_view(model):  # a patched model: its base modules
            plan = checked_plan(model, adapter, registry)
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
        steps = steps_without_model(spec, meta, fp, set(tensors), registry)
        options, modules = {}, {}
        module_names = sorted({n.rsplit(".", k)[0] for n in fp_names
                               for k in range(1, n.count(".") + 1)}) if fp else \
            sorted(t for t in json.loads(meta.get("targets", "{}")) if t)
        params = fp_names

    by_rule: dict[str, ExportRule] = {}
    used: set[str] = set()
    for rule, target, roles, cls in steps:
        er = by_rule.setdefault(rule.where, ExportRule(
            rule, options.get(rule.where, rule.options), file_tensors=tensors, exported=used))
        er.targets[target] = cls
        er.roles[target] = tuple(roles)
    ctx = ExportContext(model, modules, module_names, base_name)

    exported: list[tuple[str, object, list[ExportRule]]] = []
    trained: list[ExportRule] = []
    for name in dict.fromkeys(r.method for r in spec.rules):
        mine = [by_rule[r.where] for r in spec.rules if r.method == name and r.where in by_rule]
        if not mine:
            continue
        method = registry.method(name)
        if method.family == "train":
            trained += mine
            continue
        if method.family == "freeze":  # how the base is stored is no part of the adapter:
            continue                   # a QLoRA spec exports as the plain LoRA it trained
        exported.append((name, codec_for(registry, name), mine))
    # Methods that ride along another's config (trainable tokens beside LoRA) do so
    # when exactly one other method is exported; alone, they export on their own.
    riders = [e for e in exported if e[1] is not None and e[1].beside_types] \
        if len(exported) > 1 else []
    if len(exported) - len(riders) != 1:
        riders = []
    parts: list[tuple[str, list[ExportRule], HFPeftPart]] = []
    for name, codec, mine in exported:
        if any(name == r[0] for r in riders):
            continue
        part = codec.to_hf_peft(mine, ctx) if codec is not None else None
        if part is None:
            where = ", ".join(f"{r.rule.where} (line {r.rule.line})" for r in mine)
            refuse(f"cannot export: method '{name}' ({where}) has no HF PEFT counterpart; "
                    "HF PEFT can express lora, loha, lokr, vera, oft, ia3, prompt-tuning, "
                    "p-tuning and prefix-tuning (and [[train]] rules of whole modules)")
        parts.append((name, mine, part))
    if not parts:
        refuse("cannot export: HF PEFT needs a PEFT method (LoRA, IA3, a soft prompt); "
                "this spec only has [[train]] rules")
    if len({p.peft_type for _, _, p in parts}) > 1:
        what = "; ".join(f"'{n}' ({', '.join(r.rule.where for r in rs)}) -> {p.peft_type}"
                         for n, rs, p in parts)
        refuse(f"cannot export: an HF PEFT adapter has one peft_type, and this spec mixes "
                f"methods: {what}. Split the spec, one method per adapter")
    if len(parts) > 1:
        refuse("cannot export: methods " + ", ".join(repr(n) for n, _, _ in parts) +
                " both map to HF PEFT's " + parts[0][2].peft_type + "; merge them into one")
    _, main_rules, part = parts[0]
    for name, codec, mine in riders:
        part = _beside(part, name, codec, mine, ctx)
    config = dict(part.config)
    out_tensors = dict(part.tensors)
    if trained:
        mts, extra = _modules_to_save(trained, params, module_names, main_rules)
        config["modules_to_save"] = mts
        out_tensors.update(extra)
    left = sorted(set(tensors) - used)
    if left:
        refuse(f"cannot export: tensor '{left[0]}' of the adapter file belongs to no rule "
                f"that was exported ({len(left)} such tensor(s))")

    if task_type == "auto":
        task_type = _task_type(model, fp_names)
        if task_type is None and any(r.family == "prefix" for r in spec.rules):
            task_type = "CAUSAL_LM"
    elif task_type is not None and task_type not in TASK_TYPES:
        refuse(f"unknown task type '{task_type}'; HF PEFT's are {', '.join(TASK_TYPES)}")
    full = {"peft_type": part.peft_type, "task_type": task_type,
            "base_model_name_or_path": base_name, "revision": None, "inference_mode": True,
            "modules_to_save": None, **config}
    # A key a method leaves at None that older HF PEFT versions do not know is
    # left out: their configs refuse unknown keys (peft < 0.14 has no
    # exclude_modules, nor modules_to_save for prompt tuning), and None is the
    # default wherever the key exists.
    full = dict(sorted((k, v) for k, v in full.items() if not (v is None and k in NEWER_KEYS)))
    data = serialize(out_tensors, {"format": "pt"})
    if out_dir.exists() and not out_dir.is_dir():
        refuse(f"{out_dir} exists and is not a folder")
    config_bytes = (json.dumps(full, indent=2) + "\n").encode()
    _write_folder(out_dir, {WEIGHTS_FILE: data, CONFIG_FILE: config_bytes})
    return out_dir


def _beside(main: HFPeftPart, name: str, codec: HFPeftCodec, rules: list[ExportRule],
            ctx: ExportContext) -> HFPeftPart:
    """``main`` with the config fields and tensors of a method riding along it."""
    where = ", ".join(f"{r.rule.where} (line {r.rule.line})" for r in rules)
    extra = codec.to_hf_peft_beside(rules, ctx, main) \
        if main.peft_type in codec.beside_types else None
    if extra is None:
        refuse(f"cannot export: method '{name}' ({where}) goes into one HF PEFT adapter "
                f"only beside {', '.join(codec.beside_types)}, and this spec's other "
                f"method exports as {main.peft_type}. Split the spec, one method per adapter")
    clash = sorted(k for k in extra.config if main.config.get(k) is not None)
    clash += sorted(set(extra.tensors) & set(main.tensors))
    if clash:
        refuse(f"cannot export: method '{name}' ({where}) and the {main.peft_type} rules "
                f"both set '{clash[0]}' in HF PEFT's adapter")
    return HFPeftPart(main.peft_type, {**main.config, **extra.config},
                      {**main.tensors, **extra.tensors})


def _write_folder(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into ``out_dir`` as one change: the folder is staged beside it
    (its other files hard-linked in) and swapped in, so a crash or a full disk never
    leaves new weights beside an old config."""
    with writing(out_dir, sum(map(len, files.values()))):
        stage = staging_dir(out_dir)
        try:
            if out_dir.is_dir():
                for item in out_dir.iterdir():
                    if item.name in files:
                        continue
                    if item.is_dir() and not item.is_symlink():
                        shutil.copytree(item, stage / item.name, symlinks=True)
                        continue
                    try:
                        os.link(item, stage / item.name, follow_symlinks=False)
                    except OSError:
                        shutil.copy2(item, stage / item.name, follow_symlinks=False)
            for name, data in files.items():
                atomic_write_bytes(stage / name, data)
            replace_dir(stage, out_dir)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def _modules_to_save(trained: list[ExportRule], params: set[str], module_names: list[str],
                     main_rules: list[ExportRule]):
    """[[train]] rules as ``modules_to_save``: only whole modules can be."""
    names = {t: r for r in trained for t in r.targets}
    owners: dict[str, None] = {}
    for name, rule in names.items():
        owner = name.rpartition(".")[0]
        if not owner:
            refuse(f"cannot export {rule.rule.where}: it trains '{name}', a parameter of the "
                    "model itself; HF PEFT's modules_to_save holds submodules")
        missing = sorted(p for p in params if p.startswith(owner + ".") and p not in names)
        if missing:
            refuse(f"cannot export {rule.rule.where}: it trains '{name}' but not '{missing[0]}'"
                    f" of the same module '{owner}'; HF PEFT's modules_to_save trains whole "
                    "modules (there is no per-parameter selection such as BitFit's biases)")
        owners.setdefault(owner)
    chosen = [m for m in owners if not any(m.startswith(o + ".") for o in owners)]
    for m in chosen:
        clash = [n for n in module_names if n != m and n.endswith(m)]
        if clash:
            refuse(f"cannot export: module '{m}' for modules_to_save would also match "
                    f"'{clash[0]}' under HF PEFT's suffix rule")
        for r in main_rules:
            for t in r.targets:
                if t and (t == m or t.startswith(m + ".") or m.startswith(t + ".")):
                    refuse(f"cannot export: '{t}' ({r.rule.where}, {r.rule.method}) overlaps "
                            f"'{m}', which a [[train]] rule trains whole; HF PEFT does not "
                            "adapt modules inside modules_to_save")
    tensors = {}
    for r in trained:
        for t in r.targets:
            tensors[PREFIX + t] = r.tensor(t)
    return chosen, tensors
