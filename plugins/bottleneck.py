"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2022).

``h ← h + s · up(act(down(LN?(h))))``: a down-projection to ``size`` units, a
non-linearity, an up-projection back, scaled by ``scaling``. The
up-projection starts at zero, so outputs are unchanged at apply, bit for bit.

Placement:

* ``after = [...]``: serially on the selected modules' outputs (the first
  element, for modules that return tuples);
* ``parallel_to = [...]``: beside the selected modules, reading their input
  and adding to their output (He et al.'s parallel adapter);
* ``parallel_to_residual = [...]``: the parallel adapter for post-norm blocks
  such as BERT's ``BertOutput(hidden, input_tensor)``, whose norm follows the
  residual sum: the adapter reads the block input ``input_tensor`` (the second
  argument) and adds to it, so the norm sees FFN(x) + adapter(x) + x;
* ``preset = "houlsby" | "pfeiffer" | "parallel"``: the classic layouts,
  expanded to selectors for the model's architecture (peftspec's default
  model, GPT-2, Llama, BERT); ``peftspec plan`` shows the expansion.

The target is replaced by a thin wrapper that runs it unchanged and adds the
adapter's output; the wrapper adopts the target's tensors and children, so it
works on any module and the base model's state-dict keys do not change
(``blocks.0.mlp.adapter.down.weight`` is added beside them). It adds 2·d·m + d + m parameters (plus 2·d with
``layer_norm``), d the target's width and m the bottleneck size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from peftspec.plugin_api import Method, hookimpl, option, selectors

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU,
               "tanh": nn.Tanh}
CHILD = "adapter"

# Preset layouts: architecture -> preset -> {"after": [...], "parallel_to": [...]}.
# An architecture is recognised by a module name it must have.
LAYOUTS = {
    "peftspec default model": ("blocks.0.attn.o_proj", {
        "houlsby": {"after": ["blocks.*.attn.o_proj", "blocks.*.mlp"]},
        "pfeiffer": {"after": ["blocks.*.mlp"]},
        "parallel": {"parallel_to": ["blocks.*.mlp"]},
    }),
    "GPT-2": ("h.0.attn.c_proj", {
        "houlsby": {"after": ["**.h.*.attn.c_proj", "**.h.*.mlp"]},
        "pfeiffer": {"after": ["**.h.*.mlp"]},
        "parallel": {"parallel_to": ["**.h.*.mlp"]},
    }),
    "Llama": ("layers.0.self_attn.o_proj", {
        "houlsby": {"after": ["**.layers.*.self_attn.o_proj", "**.layers.*.mlp"]},
        "pfeiffer": {"after": ["**.layers.*.mlp"]},
        "parallel": {"parallel_to": ["**.layers.*.mlp"]},
    }),
    "BERT": ("encoder.layer.0.attention.output.dense", {
        "houlsby": {"after": ["**.encoder.layer.*.attention.output.dense",
                              "**.encoder.layer.*.output.dense"]},
        "pfeiffer": {"after": ["**.encoder.layer.*.output.dense"]},
        "parallel": {"parallel_to_residual": ["**.encoder.layer.*.output"]},
    }),
}


@dataclass(frozen=True)
class BottleneckOptions:
    after: tuple[str, ...] = selectors(required=False,
                                       doc="modules whose output passes through an adapter")
    parallel_to: tuple[str, ...] = selectors(required=False,
                                             doc="modules to put an adapter beside")
    parallel_to_residual: tuple[str, ...] = selectors(
        required=False, doc="post-norm blocks (BERT's BertOutput) to put an adapter beside")
    preset: Literal["houlsby", "pfeiffer", "parallel"] | None = option(
        None, doc="a classic layout, expanded to after/parallel_to for the model")
    size: int | None = option(None, doc="bottleneck width m", min=1)
    reduction_factor: int | None = option(None, doc="m = d / reduction_factor", min=1)
    activation: Literal["relu", "gelu", "swish", "silu", "tanh"] = option("relu")
    scaling: float | None = option(None, doc="s; 1.0, or 4.0 for the parallel preset")
    layer_norm: bool = option(False, doc="a LayerNorm before the down-projection")
    dropout: float = option(0.0, doc="dropout inside the adapter", min=0.0, max=0.999)
    dim: int | None = option(None, doc="the target's width d, when it cannot be inferred",
                             min=1)

    def __post_init__(self):
        if self.size is None and self.reduction_factor is None:
            raise ValueError("give the bottleneck width: 'size' or 'reduction_factor'")
        if self.size is not None and self.reduction_factor is not None:
            raise ValueError("give one of 'size' and 'reduction_factor', not both")
        placed = self.after or self.parallel_to or self.parallel_to_residual
        if self.preset is None and not placed:
            raise ValueError("say where adapters go: 'after', 'parallel_to' or 'preset'")
        if self.preset is not None and placed:
            raise ValueError("'preset' chooses the modules itself; drop 'after'/'parallel_to' "
                             "or the preset")

    @property
    def s(self) -> float:
        if self.scaling is not None:
            return self.scaling
        return 4.0 if self.preset == "parallel" else 1.0


def _io(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) widths of a linear-like module: Linear (and modules that say
    ``in_features``/``out_features``, as LoRA's do) or GPT-2's Conv1D."""
    if isinstance(getattr(module, "in_features", None), int) and \
            isinstance(getattr(module, "out_features", None), int):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def _width(module: nn.Module, side: str) -> int | None:
    """The module's output (or input) width: its own, or its last (first) linear's."""
    dims = [io for io in map(_io, module.modules()) if io is not None]
    if not dims:
        return None
    return dims[-1][1] if side == "out" else dims[0][0]


class Bottleneck(nn.Module):
    """down (d→m) → activation → up (m→d), up zero-initialised; optional LayerNorm first."""

    def __init__(self, d: int, m: int, opts: BottleneckOptions, like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.norm = nn.LayerNorm(d, **kw) if opts.layer_norm else None
        self.down = nn.Linear(d, m, **kw)
        self.act = ACTIVATIONS[opts.activation]()
        self.up = nn.Linear(m, d, **kw)
        self.dropout = opts.dropout
        self.scaling = opts.s
        with torch.no_grad():
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h) if self.norm is not None else h
        x = self.act(self.down(x))
        if self.dropout:
            x = nn.functional.dropout(x, self.dropout, self.training)
        return self.up(x) * self.scaling


def _add_to_output(output, delta):
    if isinstance(output, tuple):
        return (output[0] + delta,) + output[1:]
    return output + delta


class WithAdapter(nn.Module):
    """Runs ``base`` unchanged, then adds the adapter's output to its output.

    ``base`` is held unregistered; the wrapper adopts its parameter and buffer
    dicts (the same dict objects) and its children, so every base tensor keeps
    its state-dict name and identity, ``.to()`` reaches the tensors ``base``
    uses, and ``base`` itself never sees the adapter: a container such as
    ``nn.Sequential`` must not find an extra child when it iterates.
    """

    def __init__(self, base: nn.Module, adapter: "Bottleneck", parallel: str):
        super().__init__()
        self.__dict__["base"] = base
        self._parameters = base._parameters
        self._buffers = base._buffers
        self._non_persistent_buffers_set = base._non_persistent_buffers_set
        self._modules.update(base._modules)
        self.adapter = adapter
        self.parallel = parallel

    def __setattr__(self, name, value):
        # A child replaced through the wrapper (another method patching a module
        # inside this one) must reach the wrapped module, whose forward runs.
        super().__setattr__(name, value)
        base = self.__dict__.get("base")
        if base is not None and isinstance(value, nn.Module) and name in base._modules:
            setattr(base, name, value)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        # the adapter child reports its own; a wrapped LoRA module's tensors are
        # adopted here under their names, so report them on its behalf
        inner = getattr(self.base, "adapter_params", None)
        return inner() if callable(inner) else {}

    def forward(self, *args, **kwargs):
        if self.parallel == "parallel_to_residual":  # add into the residual input
            args = list(args)
            if len(args) > 1:
                args[1] = args[1] + self.adapter(args[1])
            else:
                kwargs["input_tensor"] = kwargs["input_tensor"] + \
                    self.adapter(kwargs["input_tensor"])
            return self.base(*args, **kwargs)
        out = self.base(*args, **kwargs)
        if self.parallel == "parallel_to":
            x = args[0] if args else kwargs.get("hidden_states",
                                                next(iter(kwargs.values()), None))
        else:
            x = out[0] if isinstance(out, tuple) else out
        return _add_to_output(out, self.adapter(x))

    def extra_repr(self) -> str:
        return f"base={type(self.base).__name__}, parallel={self.parallel}"


class BottleneckMethod(Method):
    name = "bottleneck"
    family = "augment"
    Options = BottleneckOptions
    summary = "bottleneck adapters after or beside modules (Houlsby, Pfeiffer, parallel)"
    unchanged_at_apply = True  # the up-projection starts at zero
    example = """
[[augment]]
method = "bottleneck"
after = ["**.mlp"]          # or parallel_to = [...], or preset = "houlsby"
size = 64                   # or reduction_factor = 16
activation = "relu"
"""

    def resolve_options(self, options: BottleneckOptions, model: nn.Module):
        if options.preset is None:
            return options
        names = {n for n, _ in model.named_modules()}
        for arch, (probe, layouts) in LAYOUTS.items():
            if any(n == probe or n.endswith("." + probe) for n in names):
                if options.preset not in layouts:
                    raise ValueError(f"preset '{options.preset}' has no layout for {arch} "
                                     "models; give 'after' or 'parallel_to' selectors")
                layout = layouts[options.preset]
                from dataclasses import replace
                return replace(options, preset=None, scaling=options.s,
                               after=tuple(layout.get("after", ())),
                               parallel_to=tuple(layout.get("parallel_to", ())),
                               parallel_to_residual=tuple(layout.get("parallel_to_residual",
                                                                     ())))
        raise ValueError(f"preset '{options.preset}' does not know this architecture "
                         f"({type(model).__name__}); give 'after' or 'parallel_to' selectors "
                         f"(presets know: {', '.join(LAYOUTS)})")

    def _dims(self, module: nn.Module, step) -> tuple[int | None, int | None]:
        d = step.options.dim or _width(module, "out")
        if d is None:
            return None, None
        if "parallel_to" in step.roles and _width(module, "in") not in (None, d):
            return d, None  # reads the module's input, adds to its output
        m = step.options.size or max(1, d // step.options.reduction_factor)
        return d, m

    def check(self, module, step):
        if len(step.roles) > 1:
            return f"it is selected by {' and '.join(step.roles)}; pick one placement"
        if CHILD in module._modules or hasattr(module, CHILD):
            return f"it already has an attribute named '{CHILD}'"
        d, m = self._dims(module, step)
        if d is None:
            return "cannot infer its width (no Linear inside); set 'dim'"
        if m is None:
            return "a parallel adapter needs equal input and output widths"
        return None

    def count_params(self, module, step):
        d, m = self._dims(module, step)
        return 2 * d * m + d + m + (2 * d if step.options.layer_norm else 0)

    def apply(self, module, step):
        d, m = self._dims(module, step)
        like = next(module.parameters())
        return WithAdapter(module, Bottleneck(d, m, step.options, like),
                           parallel=step.roles[0])


@hookimpl
def register_methods(register):
    register(BottleneckMethod())
