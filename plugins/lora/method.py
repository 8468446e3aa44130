"""The ``lora`` method: which modules it takes, what it builds, how it merges."""

from __future__ import annotations

import torch

from peftspec.plugin_api import Method, install_weight, linear_dims, module_kind

from . import eva, eva_apply, init as lora_init
from .embedding import LoRAEmbedding
from .linear import LoRALinear
from .options import LoRAOptions


class LoRA(Method):
    name = "lora"
    family = "reparameterize"
    Options = LoRAOptions
    summary = "low-rank update W + s·B·A (rsLoRA, DoRA); Linear, Conv1D, Embedding"
    unchanged_at_apply = True  # B starts at zero (A, for embeddings); DoRA's m = ||W||

    def check(self, module, step):
        kind = module_kind(module)
        if kind is None:
            return "LoRA adapts Linear, Conv1D and Embedding modules only"
        if kind == "embedding" and step.options.dora:
            return "DoRA is not supported on Embedding modules; use dora = false here"
        if step.options.init in lora_init.INITS + ("eva",) and \
                (kind == "embedding" or step.options.dora):
            return (f"init '{step.options.init}' works on Linear and Conv1D modules without "
                    "DoRA; use init = 'zeros' here")
        if step.options.init != "eva":
            moved = [k for k, v in eva.OPTION_DEFAULTS.items()
                     if getattr(step.options, k) != v]
            if moved:
                return f"{moved[0]} is an EVA option: set init = 'eva' or leave it out"
        n_in, n_out = linear_dims(module, kind)
        if step.options.r > min(n_in, n_out):  # B·A has rank <= min(in, out) anyway
            return (f"r = {step.options.r} exceeds min(in, out) = {min(n_in, n_out)} of "
                    f"this {n_in}x{n_out} module; a larger rank only adds parameters")
        return None

    def count_params(self, module, step):
        kind = module_kind(module)
        n_in, n_out = linear_dims(module, kind)
        extra = n_out if step.options.dora else 0
        return step.options.r * (n_in + n_out) + extra

    def apply(self, module, step):
        kind = module_kind(module)
        if kind == "embedding":
            return LoRAEmbedding(module, step.options)
        return LoRALinear(module, kind, step.options)

    # PiSSA / OLoRA keep the original weight and put it back while the adapter is off
    def detach(self, installed, original, step):
        if getattr(installed, "rewrite", None) is not None:
            installed.rewrite.write_original()

    def attach(self, installed, original, step):
        if getattr(installed, "rewrite", None) is not None:
            installed.rewrite.write_residual()

    def release(self, installed, original, step):
        if getattr(installed, "rewrite", None) is not None:
            vars(installed)["rewrite"] = None  # merged or removed: the copy goes

    def base_note(self, options) -> str | None:
        return lora_init.BASE_NOTE if options.init in lora_init.INITS else None

    def unchanged_at_apply_with(self, options) -> bool:
        return options.init not in lora_init.INITS  # the residual + s·B₀A₀ rounds

    def init_from_data(self, model, steps, batches, report):
        """EVA (``init = "eva"``): A from the layers' inputs over ``batches``."""
        eva_apply.init_from_data(model, steps, batches, report)

    def merge(self, installed, original):
        with torch.no_grad():  # a packed weight becomes a dense one: never requantized
            install_weight(original, installed.merged_weight())
        return original
