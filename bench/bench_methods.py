"""Per method: peftspec against HF PEFT's same method, side by side, in one run, on the CPU.

Two measurements per method of :data:`METHODS` (a table: add a row for a new
method, its peftspec rule and its HF PEFT config):

1. **apply**: the method on every linear layer of a 512-layer tiny Llama (7 per
   layer, 3,584 targets): ``peftspec.apply`` against ``peft.get_peft_model``,
   each on a fresh model, median of interleaved repeats. Goal: peftspec <= 1/10
   of HF's time.
2. **forward**: the unmerged method on GPT-2 small, batch 4x256, eval,
   ``torch.no_grad``: each variant's forward time over the plain model's,
   base and both variants interleaved, median of the per-round ratios. The
   three share one set of base weights (the same memory), so where a copy's
   weights landed does not move the ratio. Goal: peftspec's overhead <= HF's.
   HF PEFT's LoHa, LoKr and OFT adapt only
   ``nn.Linear``, which in GPT-2 is ``lm_head`` (768 -> 50,257) alone, so they
   are measured there; LoRA, IA3 and VeRA adapt the ``Conv1D`` projections.

Adapters start at their methods' initial values (an update of zero; the cost
does not depend on the values); the forward part checks that peftspec's
outputs are the plain model's, bit for bit. Helpers (timing, models, batch)
come from ``bench_core.py``.

Run ``python bench/bench_methods.py`` (several minutes), ``--only apply``,
``--method loha`` (repeatable), ``--quick`` for a smoke test, ``--json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import bench_core as core  # noqa: E402 - sets HF_HUB_OFFLINE, imports peft/transformers
import peft  # noqa: E402
import peftspec  # noqa: E402
from benchenv import header, loadavg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA = core.LLAMA_LINEARS
GPT2_CONV1D = ["c_attn", "c_proj", "c_fc"]


@dataclass(frozen=True)
class MethodCase:
    """One row: how each side applies the method to a list of leaf module names."""

    name: str
    rule: Callable[[list[str]], str]            # leaf names -> peftspec TOML rule
    hf: Callable[[list[str], bool], object]     # (leaf names, conv1d) -> HF PEFT config
    gpt2_targets: list[str]                     # what it adapts in GPT-2 small
    what: str                                   # the settings, for the table


def _rule(method: str, extra: str, section: str = "reparameterize", key: str = "modules"):
    return lambda mods: (f'[[{section}]]\nmethod = "{method}"\n'
                         f"{key} = {json.dumps(['**.' + m for m in mods])}\n{extra}")


METHODS = [
    MethodCase("lora", _rule("lora", "r = 8\nalpha = 16\n"),
               lambda t, c: peft.LoraConfig(r=8, lora_alpha=16, target_modules=t,
                                            fan_in_fan_out=c),
               GPT2_CONV1D, "r=8"),
    MethodCase("ia3", _rule("ia3", "", section="augment"),
               lambda t, c: peft.IA3Config(target_modules=t, feedforward_modules=[],
                                           fan_in_fan_out=c),
               GPT2_CONV1D, "output scaling"),
    MethodCase("loha", _rule("loha", "r = 8\nalpha = 8\n"),
               lambda t, c: peft.LoHaConfig(r=8, alpha=8, target_modules=t),
               ["lm_head"], "r=8"),
    MethodCase("lokr", _rule("lokr", "r = 8\nalpha = 8\n"),
               lambda t, c: peft.LoKrConfig(r=8, alpha=8, target_modules=t),
               ["lm_head"], "r=8"),
    MethodCase("vera", _rule("vera", "r = 64\n"),
               lambda t, c: peft.VeraConfig(r=64, target_modules=t, fan_in_fan_out=c),
               GPT2_CONV1D, "r=64"),
    MethodCase("oft", _rule("oft", "block_size = 32\n"),
               lambda t, c: peft.OFTConfig(oft_block_size=32, target_modules=t),
               ["lm_head"], "block 32, Neumann"),
]


@dataclass(frozen=True)
class Settings:
    llama_layers: int = 512
    apply_rounds: int = 2
    apply_extra_peftspec: int = 1
    forward: core.Settings = core.Settings(forward_rounds=5)


QUICK = Settings(llama_layers=16, apply_rounds=1, apply_extra_peftspec=0, forward=core.QUICK)


def registry():
    """Installed plugins; IA3 from its example folder when it is not installed."""
    reg = peftspec.build_registry()
    if "ia3" not in reg.methods:
        path = ROOT / "examples" / "peftspec-ia3" / "peftspec_ia3" / "plugin.py"
        spec = importlib.util.spec_from_file_location("bench_ia3_plugin", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        reg = peftspec.build_registry(plugins=[mod])
    return reg


def _hf_apply(model, case: MethodCase, targets, conv1d=False):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, case.hf(targets, conv1d))


def bench_apply(case: MethodCase, s: Settings, reg) -> dict:
    spec = peftspec.parse_spec(case.rule(LLAMA), registry=reg)
    peftspec.apply(spec, core._tiny_llama(2), registry=reg)  # warm-up
    _hf_apply(core._tiny_llama(2), case, LLAMA)
    times = {"peftspec": [], "hf": []}
    cpu = {"peftspec": [], "hf": []}
    for i in range(s.apply_rounds + s.apply_extra_peftspec):
        for variant in (["hf", "peftspec"] if i % 2 == 0 else ["peftspec", "hf"]):
            if variant == "hf" and i >= s.apply_rounds:
                continue
            core._seed(i)
            model = core._tiny_llama(s.llama_layers)
            if variant == "peftspec":
                times[variant].append(core._timed(
                    lambda: peftspec.apply(spec, model, registry=reg), cpu[variant]))
            else:
                times[variant].append(core._timed(lambda: _hf_apply(model, case, LLAMA),
                                                  cpu[variant]))
            del model
            gc.collect()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"targets": s.llama_layers * len(LLAMA), "median_s": med, "times_s": times,
            "ratio": med["peftspec"] / med["hf"],
            "cpu_ratio": statistics.median(cpu["peftspec"]) / statistics.median(cpu["hf"]),
            "min_ratio": min(times["peftspec"]) / min(times["hf"])}


def bench_forward(case: MethodCase, s: Settings, reg) -> dict:
    fs = s.forward
    base = core._gpt2(fs).eval()
    spec = peftspec.parse_spec(case.rule(case.gpt2_targets), registry=reg)
    models = {"base": base,
              "peftspec": peftspec.apply(spec, core.sharing_copy(base), registry=reg).eval(),
              "hf": _hf_apply(core.sharing_copy(base), case, case.gpt2_targets,
                              conv1d=case.gpt2_targets != ["lm_head"]).eval()}
    shared = {t.data_ptr() for t in base.parameters()}
    for k in ("peftspec", "hf"):
        assert shared <= {t.data_ptr() for t in models[k].parameters()}, f"{k}: base not shared"
    x = core._batch(fs)
    names = list(models)
    times = {k: [] for k in names}
    cpu = {k: [] for k in names}
    ratios = {"peftspec": [], "hf": []}
    with torch.no_grad():
        ref = models["base"](x).logits
        assert torch.equal(models["peftspec"](x).logits, ref), "peftspec changed the outputs"
        models["hf"](x)  # warm-up
        del ref
        for i in range(fs.forward_rounds):
            this = {}
            for k in core._rotated(names, i):
                this[k] = core._timed(lambda: models[k](x), cpu[k])
                times[k].append(this[k])
            for k in ratios:
                ratios[k].append(this[k] / this["base"])
    del models
    gc.collect()
    r = {k: statistics.median(v) for k, v in ratios.items()}
    # peftspec's time over HF's in the same round: the plain model's own noise drops
    # out, which decides it better where the two do the same operations (IA3, OFT).
    paired = [a / b for a, b in zip(times["peftspec"], times["hf"])]
    return {"targets": case.gpt2_targets, "shape": [fs.batch, fs.seq],
            "paired_ratio": statistics.median(paired),
            "paired_faster_rounds": sum(p < 1 for p in paired), "rounds": len(paired),
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio_to_base": r, "round_ratios": ratios,
            "min_ratio_to_base": {k: min(times[k]) / min(times["base"]) for k in ratios},
            "cpu_ratio_to_base": {k: statistics.median(cpu[k]) / statistics.median(cpu["base"])
                                  for k in ratios}}


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _of_hf(ours: float, hf: float) -> str:
    """peftspec's forward overhead as a fraction of HF's; where HF's is within half a
    percent of nothing (or below: noise, the plain model measured slower), a fraction
    means nothing, so both are given in percent."""
    if hf > 0.005:
        return f"{ours / hf:.2f} of HF's overhead"
    return f"{ours * 100:+.1f}% vs HF's {hf * 100:+.1f}%"


def table(res: dict) -> str:
    rows = ["| method | part | peftspec | HF PEFT | peftspec / HF | cross-check: fastest / CPU "
            "(forward: and peftspec's time over HF's, round by round) "
            "| goal | met |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["methods"].items():
        if "apply" in r:
            a = r["apply"]
            m = a["median_s"]
            rows.append(f"| {name} ({r['what']}) | apply, {a['targets']:,} Linear | "
                        f"{core._fmt_s(m['peftspec'])} | {core._fmt_s(m['hf'])} | "
                        f"{a['ratio']:.3f} (1/{1 / a['ratio']:.0f}) | {a['min_ratio']:.3f} / "
                        f"{a['cpu_ratio']:.3f} | <= 0.1 | {_yes(a['ratio'] <= 0.1)} |")
        if "forward" in r:
            f = r["forward"]
            q, mn, c = f["ratio_to_base"], f["min_ratio_to_base"], f["cpu_ratio_to_base"]
            rows.append(f"| {name} ({r['what']}) | forward / plain ({core._fmt_s(f['median_s']['base'])}"
                        f"), {'+'.join(f['targets'])} | {q['peftspec']:.3f}x | {q['hf']:.3f}x | "
                        f"{_of_hf(q['peftspec'] - 1, q['hf'] - 1)} | "
                        f"{mn['peftspec']:.3f}x vs {mn['hf']:.3f}x / {c['peftspec']:.3f}x vs "
                        f"{c['hf']:.3f}x; same round: {f['paired_ratio']:.3f} of HF's time, "
                        f"faster in {f['paired_faster_rounds']} of {f['rounds']} | <= HF's | "
                        f"{_yes(q['peftspec'] <= q['hf'])} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["apply", "forward"], action="append")
    ap.add_argument("--method", choices=[m.name for m in METHODS], action="append",
                    help="only this method (repeatable)")
    ap.add_argument("--quick", action="store_true", help="small models, one round")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, help="forward rounds (default 5) and HF apply "
                                               "repeats (default 2) on a busy machine")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    if args.rounds:
        s = Settings(s.llama_layers, args.rounds, s.apply_extra_peftspec,
                     core.Settings(**{**vars(s.forward), "forward_rounds": args.rounds}))
    reg = registry()
    parts = args.only or ["apply", "forward"]
    res = {"env": core._env(args.threads), "quick": args.quick, "methods": {}}
    t0 = time.perf_counter()
    for case in METHODS:
        if args.method and case.name not in args.method:
            continue
        out = res["methods"][case.name] = {"what": case.what}
        for part in parts:
            print(f"[bench] {case.name} {part} ...", file=sys.stderr, flush=True)
            out[part] = (bench_apply if part == "apply" else bench_forward)(case, s, reg)
    res["env"]["loadavg_end"] = loadavg()
    res["total_s"] = time.perf_counter() - t0
    print(header(res["env"], args.quick))
    print()
    print(table(res))
    if args.json:
        print()
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
