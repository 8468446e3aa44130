"""The conformance checks, in an order where each builds on the last."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from peftspec.core.method import adapter_state
from peftspec.formats.hf_peft.codec import codec_for
from peftspec.testing.buffers import check_buffers
from peftspec.testing.report import CHECKS, Failed, Result, Skip, expect


def _output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in {type(out).__name__}; pass inputs= "
                    "as a callable returning a tensor")


def runner(inputs) -> Callable[[nn.Module, slice | None], torch.Tensor]:
    """``run(model, rows)``: the model's output tensor for ``inputs`` (rows sliced)."""

    def pick(x, rows):
        return x[rows] if rows is not None and isinstance(x, torch.Tensor) else x

    def run(model, rows=None):
        if callable(inputs):
            if rows is not None:
                raise Skip("per-row checks need tensor or dict inputs, not a callable")
            return _output(inputs(model))
        if isinstance(inputs, dict):
            return _output(model(**{k: pick(v, rows) for k, v in inputs.items()}))
        return _output(model(pick(inputs, rows)))

    return run


def batch_size(inputs) -> int | None:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, dict):
        sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor)}
        return sizes.pop() if len(sizes) == 1 else None
    return None


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("inf")


class Checks:
    """The checks of one :func:`peftspec.testing.check_method` call, run in order by
    :meth:`run_all`; each records a :class:`~peftspec.testing.report.Result`."""

    def __init__(self, ps, registry, rule, factory, run, inputs, steps, lr, seed, atol, tmp,
                 report):
        self.ps, self.reg, self.factory, self.run_model = ps, registry, factory, run
        self.inputs, self.steps, self.lr, self.seed, self.atol = inputs, steps, lr, seed, atol
        self.tmp, self.report = tmp, report
        self.rule, self.methods = rule, []  # parsed in run_all: a failure there is reported
        failures = [str(f) for f in registry.failures]
        if failures:
            self._record("registration", "failed", "; ".join(failures))

    # -- helpers -------------------------------------------------------------------
    def fresh(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.factory().eval()

    @torch.no_grad()
    def out(self, model, rows=None) -> torch.Tensor:
        return self.run_model(model, rows).detach().clone()

    def _record(self, check, status, detail=""):
        self.report.results.append(Result(check, status, detail))

    def check(self, name, fn, needs: tuple[tuple[str, str], ...] = ()) -> None:
        """Run ``fn`` as check ``name``, or skip it with the reason when a check it
        builds on (``needs``: (attribute it sets, check) pairs) did not pass."""
        missing = [check for attr, check in needs if not hasattr(self, attr)]
        if missing:
            missing = list(dict.fromkeys(missing))
            self._record(name, "skipped", f"needs {' and '.join(missing)} to pass, and "
                                          f"{'it' if len(missing) == 1 else 'they'} did not")
            return
        try:
            detail = fn()
        except Skip as exc:
            self._record(name, "skipped", str(exc))
        except Failed as exc:
            self._record(name, "failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported
            self._record(name, "failed", f"{type(exc).__name__}: {exc}")
        else:
            self._record(name, "passed", detail or "")

    # -- the checks, in an order where each builds on the last --------------------
    def run_all(self) -> None:
        ps = self.ps
        self.base = base = self.fresh()
        self.base_out = self.out(base)
        self.base_params = dict(base.named_parameters())
        self.base_values = {n: p.detach().clone() for n, p in self.base_params.items()}
        self.base_flags = {n: p.requires_grad for n, p in self.base_params.items()}
        self.base_types = {n: type(m) for n, m in base.named_modules()}
        self.base_modules = [m for _, m in base.named_modules()]
        self.base_keys = set(base.state_dict())
        try:  # the spec, its plan and the apply (a plugin's options class may fail too)
            self.spec = ps.parse_spec(self.rule, registry=self.reg)
            self.methods = [self.reg.method(r.method) for r in self.spec.rules]
            self.plan = ps.compile_plan(self.spec, base, registry=self.reg)
            ps.apply_plan(self.plan, base, registry=self.reg)
        except Exception as exc:  # noqa: BLE001
            self._record("apply", "failed", f"{type(exc).__name__}: {exc}")
            for name in CHECKS:
                self._record(name, "skipped", "needs apply to pass, and it did not")
            return
        self.applied_out = self.out(base)
        # what the frozen base is from apply on: the base itself, or a residual a
        # method announced (Method.base_note: PiSSA) - the promise holds for it
        self.applied_values = {n: p.detach().clone() for n, p in self.base_params.items()}
        self.check("count_params", self.count_params)
        self.check("unchanged_at_apply", self.unchanged_at_apply)
        self.check("frozen_base", self.frozen_base)
        self.check("modules", self.modules)
        self.file = self.tmp / "adapter.safetensors"
        trained = (("trained_out", "frozen_base"),)
        saved = (*trained, ("saved", "save_load"))
        self.check("save_load", self.save_load, trained)
        self.check("buffers", self.buffers, saved)
        self.check("switching", self.switching, saved)
        self.check("rows", self.rows, (*saved, ("switch_model", "switching")))
        self.check("remove", self.remove)
        self.check("merge", self.merge, saved)
        self.check("hf_peft", self.hf_peft, saved)

    def count_params(self):
        adapter = self.ps.adapter_params(self.base)
        added = sum(p.numel() for p in {id(p): p for p in adapter.values()}.values())
        expect(added == self.plan.params_added,
                f"plan says {self.plan.params_added:,} parameters added, adapter_params() "
                f"exposes {added:,}")
        trained = set(self.plan.trained_base)
        trainable = set(self.ps.trainable_parameters(self.base))
        expect(trainable == set(adapter) | trained,
                f"trainable {sorted(trainable - set(adapter) - trained)[:3]} beyond the "
                f"adapter, or adapter parameters left frozen "
                f"{sorted(set(adapter) - trainable)[:3]}")
        return f"{added:,} parameters"

    def unchanged_at_apply(self):
        claim = [m.name for m, r in zip(self.methods, self.spec.rules)
                 if not m.unchanged_at_apply_with(r.options)]
        if claim:
            raise Skip(f"{', '.join(sorted(set(claim)))} does not claim unchanged_at_apply")
        expect(torch.equal(self.applied_out, self.base_out),
                f"outputs changed at apply (max |diff| "
                f"{_max_diff(self.applied_out, self.base_out):.3g}) although the method "
                "claims unchanged_at_apply")

    def frozen_base(self):
        model, ps = self.base, self.ps
        now = dict(model.named_parameters())
        moved = [n for n, p in self.base_params.items() if now.get(n) is not p]
        expect(not moved, f"base parameters not the same objects under their names after "
                           f"apply: {moved[:3]} (keep the base module's tensors: "
                           "self.weight = base.weight)")
        expect(self.base_keys <= set(model.state_dict()),
                f"base state-dict keys gone: {sorted(self.base_keys - set(model.state_dict()))[:3]}")
        params = ps.trainable_parameters(model)
        adapter_before = {n: p.detach().clone() for n, p in ps.adapter_params(model).items()}
        opt = torch.optim.AdamW(params.values(), lr=self.lr)
        model.train()
        for _ in range(self.steps):
            opt.zero_grad()
            loss = self.run_model(model).float().pow(2).mean()
            expect(loss.requires_grad, "training changed no adapter parameter: the output "
                                        "depends on none of them; does forward() use them?")
            loss.backward()
            opt.step()
        model.eval()
        trained = set(self.plan.trained_base)
        changed = [n for n in self.base_params if n not in trained and
                   not torch.equal(self.base_params[n], self.applied_values[n])]
        rewritten = [n for n in self.base_params if n not in trained and
                     not torch.equal(self.applied_values[n], self.base_values[n])]
        expect(not rewritten or self.plan.notes,
                f"apply changed frozen base parameters {rewritten[:3]} and the plan says "
                "nothing of it (Method.base_note)")
        expect(not changed, f"frozen base parameters changed in training: {changed[:3]}")
        grads = [n for n, p in self.base_params.items() if n not in trained and p.grad is not None]
        expect(not grads, f"frozen base parameters received gradients: {grads[:3]}")
        moved = {n: p for n, p in ps.adapter_params(model).items()
                 if not torch.equal(p, adapter_before[n])}
        expect(bool(moved) or not adapter_before,
                "training changed no adapter parameter: does forward() use them?")
        self.trained_out = self.out(model)
        return f"{self.steps} AdamW steps; {len(moved)} adapter tensors trained"

    def modules(self):
        """The modules apply built are whole ``nn.Module`` objects: every attribute
        ``nn.Module.__init__`` sets is there, and no two modules share a container
        (what :func:`peftspec.plugin_api.init_module` must give, like the real
        ``__init__``)."""
        before = {id(m) for m in self.base_modules}
        new = [(n, m) for n, m in self.base.named_modules() if id(m) not in before]
        expected = set(vars(nn.Module()))
        owner: dict[int, str] = {}
        for name, module in new:
            missing = sorted(expected - set(vars(module)))
            expect(not missing, f"module '{name}' ({type(module).__name__}) lacks "
                                 f"{', '.join(missing[:3])}: build it with "
                                 "super().__init__() or init_module(self) first")
            for key in ("_parameters", "_buffers", "_modules", "_forward_hooks",
                        "_forward_pre_hooks", "_state_dict_hooks"):
                other = owner.setdefault(id(vars(module)[key]), name)
                expect(other == name, f"modules '{other}' and '{name}' share one {key} dict "
                                       "(a class-level container, or one reused across "
                                       "modules)")
        return f"{len(new)} new module(s)"

    def save_load(self):
        ps = self.ps
        ps.save_adapter(self.base, self.file)
        self.saved = True  # (the checks after it load the file)
        fresh = ps.load_adapter(self.fresh(), self.file, registry=self.reg)

        ours, theirs = adapter_state(self.base), adapter_state(fresh)
        expect(set(ours) == set(theirs), f"loaded adapter tensors differ in names: "
                                          f"{sorted(set(ours) ^ set(theirs))[:3]}")
        expect(all(torch.equal(ours[n], theirs[n]) for n in ours), "loaded values differ")
        out = self.out(fresh)
        expect(torch.equal(out, self.trained_out),
                f"outputs after load differ (max |diff| {_max_diff(out, self.trained_out):.3g})")

    def buffers(self):
        return check_buffers(self)  # (peftspec.testing.buffers)

    def switching(self):
        ps = self.ps
        model = ps.load_adapter(self.fresh(), self.file, registry=self.reg)
        ps.load_adapter(model, self.file, name="b", registry=self.reg)
        with ps.using(model, "b"), torch.no_grad():
            gen = torch.Generator().manual_seed(self.seed + 1)
            for p in ps.trainable_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        with ps.using(model, "b"):
            out_b = self.out(model)
        expect(torch.equal(self.out(model), self.trained_out), "adapter 'default' changed "
                "after switching to 'b' and back")
        with ps.disabled(model):
            expect(torch.equal(self.out(model), self.base_out),
                    "disabled(model) does not give the base model's outputs exactly")
        ps.use(model, None)
        expect(torch.equal(self.out(model), self.base_out), "use(model, None) is not the base")
        ps.use(model, "b")
        expect(torch.equal(self.out(model), out_b), "switching back to 'b' changed it")
        ps.use(model, "default")
        expect(torch.equal(self.out(model), self.trained_out), "switching back changed it")
        self.switch_model, self.out_b = model, out_b

    def rows(self):
        ps, model = self.ps, self.switch_model
        n = batch_size(self.inputs)
        if n is None or n < 3:
            raise Skip("needs tensor or dict inputs with at least 3 rows")
        # a soft prompt's row and a plain row have outputs of different lengths:
        # with prefix methods every row gets an adapter
        cycle = ("default", "b", "default") if any(m.family == "prefix" for m in
                                                   self.methods) else ("default", "b", None)
        names = [cycle[i % 3] for i in range(n)]
        try:
            with ps.rows(model, names):
                mixed = self.out(model)
        except (NotImplementedError, ps.PeftspecError) as exc:  # a clear refusal is fine
            raise Skip(f"not supported: {exc}") from None
        for i, name in enumerate(names):
            with ps.using(model, name):
                alone = self.out(model, slice(i, i + 1))
            row = mixed[i:i + 1]
            expect(row.shape == alone.shape and
                    torch.allclose(row, alone, atol=self.atol, rtol=0),
                    f"row {i} ({name}) differs from running it alone (max |diff| "
                    f"{_max_diff(row, alone):.3g})")
        return f"rows {names}"

    def remove(self):
        ps, model = self.ps, self.base
        ps.remove(model)
        expect(not ps.is_patched(model), "still patched after remove")
        expect({n: type(m) for n, m in model.named_modules()} == self.base_types,
                "module types differ from the base after remove")
        now = dict(model.named_parameters())
        expect(set(now) == set(self.base_params) and
                all(now[n] is p for n, p in self.base_params.items()),
                "parameters are not the base's own objects after remove")
        expect(all(torch.equal(p, self.base_values[n]) for n, p in now.items()),
                "parameter values differ from the base after remove")
        expect(all(p.requires_grad == self.base_flags[n] for n, p in now.items()),
                "requires_grad flags not restored")
        expect(set(model.state_dict()) == self.base_keys, "state-dict keys differ")
        expect(torch.equal(self.out(model), self.base_out), "outputs differ from the base")

    def merge(self):
        ps = self.ps
        model = ps.load_adapter(self.fresh(), self.file, registry=self.reg)
        if not all(m.mergeable for m in self.methods):
            try:
                ps.merge(model)
            except ps.NotMergeableError:
                raise Skip("not mergeable; merge refused, as it should") from None
            raise Failed("merge() succeeded although a method says mergeable = False")
        try:
            ps.merge(model)
        except ps.NotMergeableError as exc:
            if "tied" not in str(exc):
                raise
            raise Skip(f"merge refused for a tied weight, as it should: {exc}") from None
        out = self.out(model)
        expect(not ps.is_patched(model) and not ps.adapter_params(model),
                "adapter modules left after merge")
        expect({n: type(m) for n, m in model.named_modules()} == self.base_types,
                "module types differ from the base after merge")
        diff = _max_diff(out, self.trained_out)
        expect(diff <= self.atol, f"merged outputs differ from unmerged by {diff:.3g} "
                                   f"(atol {self.atol:g})")
        return f"max |diff| {diff:.2g}"

    def hf_peft(self):

        undeclared = sorted({m.name for m in self.methods if m.family != "train" and
                             codec_for(self.reg, m.name) is None})
        if undeclared or all(m.family == "train" for m in self.methods):
            raise Skip(f"{', '.join(undeclared) or 'the spec'} declares no HF PEFT support")
        ps = self.ps
        folder = ps.export_hf_peft(self.file, self.tmp / "hf", model=self.fresh(),
                                   registry=self.reg)
        back, _ = ps.import_hf_peft(folder, self.tmp / "back.safetensors",
                                    self.tmp / "back.toml", model=self.fresh(),
                                    registry=self.reg)
        model = ps.load_adapter(self.fresh(), back, registry=self.reg)
        diff = _max_diff(self.out(model), self.trained_out)
        expect(diff <= self.atol, f"export + import changed outputs by {diff:.3g}")
        detail = "export + import round trip"
        base = self.fresh()
        try:
            import peft
            from transformers import PreTrainedModel
        except ImportError:
            return detail + "; peft not installed"
        if not isinstance(base, PreTrainedModel):
            return detail + "; not a transformers model, PeftModel not tried"
        theirs = peft.PeftModel.from_pretrained(base, str(folder)).eval()
        diff = _max_diff(self.out(theirs), self.trained_out)
        expect(diff <= self.atol, f"PeftModel.from_pretrained's outputs differ by {diff:.3g}")
        return detail + "; PeftModel.from_pretrained agrees"
