"""HF PEFT's format: LoKrConfig; rules of other r / alpha become rank/alpha_pattern."""

from __future__ import annotations

from peftspec.plugin_api import HFPeftCodec

from ..lokr import LoKrOptions, layout, tensor_names
from .lycoris import export_rules, import_rules


class LoKrCodec(HFPeftCodec):
    method = "lokr"
    peft_types = ("LOKR",)

    def to_hf_peft(self, rules, ctx):
        def names(target, rule):
            module = ctx.module(target)
            if module is None:  # no --model: the file's own tensor names say it
                return [n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                    "lokr_w2_a", "lokr_w2_b")
                        if rule.has_tensor(f"{target}.{n}")]
            out_f, in_f = module.weight.shape
            return tensor_names(*layout(out_f, in_f, rule.options)[1:])

        first = rules[0].options
        return export_rules(rules, ctx, peft_type="LOKR",
                            same={"decompose_both": "decompose_both",
                                  "decompose_factor": "decompose_factor"},
                            names=names,
                            config={"decompose_both": first.decompose_both,
                                    "decompose_factor": first.decompose_factor,
                                    "rank_dropout_scale": False})

    def from_hf_peft(self, config, ctx):
        both = ctx.get("decompose_both", "bool", False)
        factor = ctx.get("decompose_factor", "int", -1)
        if factor == 0 or factor < -1:
            ctx.refuse(f"cannot import: decompose_factor = {factor}; expected -1 or >= 1")

        def names(t, module, r):
            opts = LoKrOptions(modules=(t,), r=r, decompose_both=both, decompose_factor=factor)
            out_f, in_f = module.weight.shape
            return tensor_names(*layout(out_f, in_f, opts)[1:])

        table = {}
        if both:
            table["decompose_both"] = True
        if factor != -1:
            table["decompose_factor"] = factor
        return import_rules(config, ctx, method=self.method,
                            require={"use_effective_conv2d": (False, True),
                                     "rank_dropout_scale": (False, True)},
                            names=names, table=table)
