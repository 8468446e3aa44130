"""HF PEFT's format: LoHaConfig; rules of other r / alpha become rank/alpha_pattern."""

from __future__ import annotations

from peftspec.plugin_api import HFPeftCodec

from ..loha import NAMES
from .lycoris import export_rules, import_rules


class LoHaCodec(HFPeftCodec):
    method = "loha"
    peft_types = ("LOHA",)

    def to_hf_peft(self, rules, ctx):
        return export_rules(rules, ctx, peft_type="LOHA", same={},
                            names=lambda target, rule: NAMES, config={})

    def from_hf_peft(self, config, ctx):
        return import_rules(config, ctx, method=self.method,
                            require={"use_effective_conv2d": (False, True)},
                            names=lambda t, module, r: NAMES, table={})
