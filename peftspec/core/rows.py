"""Per-row adapters: one forward pass in which each batch row uses its own adapter.

::

    with peftspec.rows(model, ["summarize", "translate", None, "summarize"]):
        out = model(input_ids)          # row 2 runs the plain base model

Inside the block, every module that any of the named adapters replaces is
stood in for by a :class:`RowDispatch`, which runs each row group through
that adapter's module (``None`` rows through the original). Modules that can
adapt a precomputed base output (LoRA's ``adapt(x, base_out)``) share one base
computation for all rows; where every row names one adapter, its own module
runs the batch. Methods that patch the whole model in place (soft
prompts) take part through :class:`~peftspec.core.capabilities.PerRow`. Outputs equal running
each row alone. The batch must have ``len(names)`` rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from peftspec.core.blame import reraise
from peftspec.core.capabilities import PerRow
from peftspec.core.errors import PeftspecError
from peftspec.core.state import install, state_of, use


class RowContext:
    """Which adapter each row of the tensors now flowing through the model uses.

    An outer dispatch that runs a subset of rows through a module (which may
    hold inner dispatches) narrows ``names`` to that subset for the call."""

    def __init__(self, names: Sequence[str | None]):
        self.names = list(names)
        self._cache: dict = {}

    def groups(self, device) -> dict[str | None, torch.Tensor]:
        key = (tuple(self.names), str(device))
        if key not in self._cache:  # every dispatcher of a forward asks the same
            out: dict[str | None, list[int]] = {}
            for i, n in enumerate(self.names):
                out.setdefault(n, []).append(i)
            self._cache[key] = {n: torch.tensor(idx, device=device) for n, idx in out.items()}
        return self._cache[key]

    @contextmanager
    def narrowed(self, idx: torch.Tensor):
        saved = self.names
        self.names = [saved[i] for i in idx.tolist()]
        try:
            yield
        finally:
            self.names = saved


class RowDispatch(nn.Module):
    """Stands in for one module path during a per-row forward."""

    def __init__(self, original: nn.Module, branches: dict[str, nn.Module], ctx: RowContext):
        super().__init__()
        self.__dict__["original"] = original
        self.__dict__["branches"] = branches
        self.__dict__["ctx"] = ctx
        self.shared_base = all(callable(getattr(m, "adapt", None)) for m in branches.values())
        # Modules of one type may offer ``add_rows_batched(per_row, x, out) -> bool``:
        # every row's update in one go, each row with its own module (None: the base).
        kinds = {type(m) for m in branches.values()}
        self.batched = getattr(kinds.pop(), "add_rows_batched", None) \
            if len(kinds) == 1 and self.shared_base else None

    def forward(self, x, *args, **kwargs):
        ctx = self.ctx
        if x.shape[0] != len(ctx.names):
            raise PeftspecError(f"per-row adapters were given for {len(ctx.names)} rows, but "
                                f"the batch has {x.shape[0]}")
        groups = ctx.groups(x.device)
        if len(groups) == 1:  # every row one adapter (or the base): its own forward,
            (name,) = groups    # without per-row kernels (the server's single tenant)
            module = self.branches.get(name) if name is not None else None
            return (module if module is not None else self.original)(x, *args, **kwargs)
        if self.shared_base:
            out = self.original(x, *args, **kwargs)  # a fresh tensor: updated in place
            if self.batched is not None:  # one batched update for all rows at once
                per_row = [self.branches.get(n) if n is not None else None for n in ctx.names]
                if self.batched(per_row, x, out):
                    return out
            base = None
            for name, idx in groups.items():
                module = self.branches.get(name) if name is not None else None
                if module is None:
                    continue
                add_rows = getattr(module, "add_rows", None)
                if add_rows is not None:  # out[idx] += delta(x[idx]), no copy of the base
                    add_rows(x, out, idx)
                    continue
                if base is None:
                    base = out.clone()
                out[idx] = module.adapt(x[idx], base[idx])
            return out
        parts = []
        for name, idx in groups.items():
            module = self.branches.get(name) if name is not None else None
            module = module if module is not None else self.original
            with ctx.narrowed(idx):
                parts.append((idx, module(x[idx], *args, **kwargs)))
        first = parts[0][1]
        if isinstance(first, tuple):
            raise PeftspecError("per-row dispatch supports modules returning one tensor")
        out = first.new_empty((x.shape[0],) + tuple(first.shape[1:]))
        for idx, value in parts:
            out[idx] = value
        return out


@contextmanager
def rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within the block, batch row ``i`` of ``model``'s input uses adapter ``names[i]``."""
    state = state_of(model)
    wanted = [n for n in dict.fromkeys(names) if n is not None]
    for n in wanted:
        if n not in state.adapters:
            raise PeftspecError(f"no adapter named {n!r} on this model; loaded: "
                                f"{', '.join(state.adapters)}")
    for n in wanted:  # found by the conformance kit: rows silently ran the base values
        trained = state.adapters[n].trained_base_names()
        if trained:
            raise NotImplementedError(
                f"adapter {n!r} trains base parameters ([[train]]: {', '.join(trained[:3])}"
                f"{', ...' if len(trained) > 3 else ''}); a per-row batch cannot give each "
                "row its own values of one shared base tensor")
    for n in wanted:  # a module may say why it cannot share a batch (PiSSA's residual)
        for rec in state.adapters[n].records:
            why = getattr(rec.installed, "rows_refusal", None)
            if why:
                raise NotImplementedError(f"adapter {n!r} on '{rec.step.target}' "
                                          f"({rec.step.method}): {why}")
    previous = state.active
    use(model, None)
    ctx = RowContext(names)
    # per path: the original module, and each adapter's outermost module there
    originals: dict[str, nn.Module] = {}
    branches: dict[str, dict[str, nn.Module]] = {}
    in_place: dict[str, list] = {}  # method name -> [(adapter, record)]
    for n in wanted:
        for rec in state.adapters[n].records:
            if rec.installed is rec.original:
                in_place.setdefault(rec.step.method, []).append((n, rec))
                continue
            originals.setdefault(rec.step.target, rec.original)
            branches.setdefault(rec.step.target, {})[n] = rec.installed
    installed = []
    handles = []
    try:
        # deeper paths first: a dispatch must not be installed inside another one
        for path, original in sorted(originals.items(), key=lambda kv: -kv[0].count(".")):
            install(model, path, RowDispatch(original, branches[path], ctx))
            installed.append((path, original))
        for method_name, entries in in_place.items():
            method = entries[0][1].method
            if not isinstance(method, PerRow):
                raise NotImplementedError(f"method {method_name!r} does not support per-row "
                                          "adapters")
            try:
                handles.append(method.rows_attach(model, {n: rec.step for n, rec in entries},
                                                  list(names)))
            except NotImplementedError:  # the documented refusal: callers catch it
                raise
            except Exception as exc:  # noqa: BLE001 - named (core.blame)
                adapter = state.adapters[entries[0][0]]
                reraise(exc, adapter.registry, [rec.step for _, rec in entries],
                        "rows_attach", adapter.plan.spec.file)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for path, original in reversed(installed):
            install(model, path, original)
        use(model, previous)
