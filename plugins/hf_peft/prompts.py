"""HF PEFT's format for soft prompts: ``PromptTuningConfig``, ``PromptEncoderConfig``
(P-tuning) and ``PrefixTuningConfig``. The stored table is HF PEFT's
``prompt_embeddings``, row for row (both store an encoder's output, not the
encoder)."""

from __future__ import annotations

from peftspec.plugin_api import HFPeftCodec

from ..prompts.models import CHILD, kv_geometry, view_for


class SoftPromptCodec(HFPeftCodec):
    """What the three share; a subclass adds its own config fields both ways."""

    kind = "prompt"  # "prefix": the table holds per-layer key/value prefixes

    def to_hf_peft(self, rules, ctx):
        rule = rules[0]
        table = rule.tensor(f"{CHILD}.embeddings")
        config = {"num_virtual_tokens": rule.options.tokens, "num_transformer_submodules": 1,
                  "token_dim": int(table.shape[1]), "num_layers": None,
                  "num_attention_heads": None}
        if self.kind == "prefix":  # without the model HF PEFT fills these in at load
            config["token_dim"] = None
            if ctx.model is not None:
                layers, heads, hd = kv_geometry(ctx.model)
                config.update(num_layers=layers, num_attention_heads=heads, token_dim=heads * hd)
        config.update(self.hf_options(rule.options, config, ctx))
        return ctx.part(self.peft_types[0], config, {"prompt_embeddings": table})

    def from_hf_peft(self, config, ctx):
        if config.get("num_transformer_submodules") not in (1, None):
            ctx.refuse(f"cannot import: num_transformer_submodules = "
                       f"{config['num_transformer_submodules']} (an encoder-decoder prompt); "
                       f"peftspec's {self.method} has one table for decoder-only models")
        if not isinstance(config.get("num_virtual_tokens"), int):
            ctx.refuse("cannot import: adapter_config.json has no num_virtual_tokens")
        table = {"method": self.method, "tokens": config["num_virtual_tokens"],
                 **self.read_options(config, ctx)}
        return ctx.imported([ctx.rule("prefix", table)],
                            {f"{CHILD}.embeddings": ("prompt_embeddings", None)})

    def hf_options(self, options, config: dict, ctx) -> dict:
        """The method's own HF PEFT config fields for a rule with ``options``."""
        return {}

    def read_options(self, config: dict, ctx) -> dict:
        """The method's own rule keys, read from HF PEFT's ``config``."""
        return {}


class PromptTuningCodec(SoftPromptCodec):
    method = "prompt-tuning"
    peft_types = ("PROMPT_TUNING",)

    def hf_options(self, options, config, ctx):
        if options.init == "vocab":
            return {"prompt_tuning_init": "SAMPLE_VOCAB"}
        # HF PEFT requires a tokenizer path with TEXT; the init does not affect the table
        if isinstance(options.init, dict) and ctx.base_model_name_or_path:
            return {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": options.init["text"],
                    "tokenizer_name_or_path": ctx.base_model_name_or_path}
        return {"prompt_tuning_init": "RANDOM"}

    def read_options(self, config, ctx):
        init = config.get("prompt_tuning_init", "RANDOM")
        text = config.get("prompt_tuning_init_text")
        if init == "SAMPLE_VOCAB":
            return {"init": "vocab"}
        if init == "TEXT" and text and view_for(ctx.model).tokenizer() is not None:
            return {"init": {"text": text}}
        return {"init": "random"}


class PTuningCodec(SoftPromptCodec):
    method = "p-tuning"
    peft_types = ("P_TUNING",)

    def hf_options(self, options, config, ctx):
        return {"encoder_reparameterization_type": options.encoder.upper(),
                "encoder_hidden_size": options.encoder_hidden or config["token_dim"],
                "encoder_num_layers": 2, "encoder_dropout": 0.0}

    def read_options(self, config, ctx):
        encoder = str(config.get("encoder_reparameterization_type", "MLP")).lower()
        if encoder not in ("mlp", "lstm"):
            ctx.refuse(f"cannot import: encoder_reparameterization_type {encoder!r}")
        out = {"encoder": encoder}
        hidden = config.get("encoder_hidden_size")
        if hidden and hidden != config.get("token_dim"):
            out["encoder_hidden"] = hidden
        return out


class PrefixTuningCodec(SoftPromptCodec):
    method = "prefix-tuning"
    peft_types = ("PREFIX_TUNING",)
    kind = "prefix"

    def hf_options(self, options, config, ctx):
        if not options.projection:
            return {"prefix_projection": False}
        return {"prefix_projection": True,
                "encoder_hidden_size": options.projection_hidden or config["token_dim"]}

    def read_options(self, config, ctx):
        layers, heads, hd = kv_geometry(ctx.model)
        for key, ours in (("num_layers", layers), ("num_attention_heads", heads),
                          ("token_dim", heads * hd)):
            if config.get(key) not in (None, ours):
                ctx.refuse(f"cannot import: adapter_config.json has {key} = {config[key]}; this "
                           f"model's prefixes have {ours} ({layers} layers, {heads} key/value "
                           f"heads of width {hd})")
        if not config.get("prefix_projection"):
            return {}
        hidden = config.get("encoder_hidden_size")
        return {"projection": True, **({"projection_hidden": hidden}
                                       if hidden and hidden != heads * hd else {})}
