"""HF PEFT's format for trainable tokens: ``TrainableTokensConfig`` on its own, or
riding along LoRA as ``LoraConfig(trainable_token_indices=...)``."""

from __future__ import annotations

from torch import nn

from peftspec.plugin_api import HFPeftCodec


class TrainableTokensCodec(HFPeftCodec):
    method = "trainable-tokens"
    peft_types = ("TRAINABLE_TOKENS",)

    def to_hf_peft(self, rules, ctx):
        indices = {tuple(r.options.token_indices) for r in rules}
        if len(indices) > 1:
            ctx.refuse("cannot export: trainable-tokens rules differ in token_indices; HF "
                       "PEFT's TrainableTokensConfig has one list")
        tensors, embeddings = {}, []
        for rule in rules:
            delta = None
            for target in rule.targets:
                if target in rule.options.tied_heads:
                    continue
                embeddings.append(target)
                delta = rule.tensor(f"{target}.trainable_tokens_delta")
                tensors[ctx.key(f"{target}.trainable_tokens_delta")] = delta
            for head in rule.options.tied_heads:  # HF PEFT saves the tied copy too
                tensors[ctx.key(f"{head}.trainable_tokens_delta")] = delta
        config = {"token_indices": list(indices.pop()),
                  "target_modules": ctx.target_modules(embeddings), "init_weights": True}
        return ctx.part("TRAINABLE_TOKENS", config, tensors)

    def from_hf_peft(self, config, ctx):
        indices = ctx.get("token_indices", "int-list", [])
        if not indices:
            ctx.refuse("cannot import: token_indices is empty")
        if config.get("target_modules") is None:
            get = getattr(ctx.model, "get_input_embeddings", None)
            emb = get() if callable(get) else None
            targets = [n for n, m in ctx.modules.items() if m is emb]
        else:
            targets = [t for t in ctx.targets() if isinstance(ctx.modules[t], nn.Embedding)]
        if not targets:
            ctx.refuse("cannot import: no embedding of this model matches target_modules "
                       f"{config.get('target_modules')!r}")
        modules, exclude = ctx.selectors(targets, ctx.base_candidates())
        table = {"method": "trainable-tokens", "modules": modules}
        if exclude:
            table["exclude"] = exclude
        table["token_indices"] = indices
        tensors = {f"{t}.trainable_tokens_delta": (ctx.key(f"{t}.trainable_tokens_delta"), None)
                   for t in targets}
        weights = {id(ctx.modules[t].weight): t for t in targets}
        for name, m in ctx.modules.items():  # HF PEFT's copies for tied heads: checked, dropped
            key = ctx.key(f"{name}.trainable_tokens_delta")
            if isinstance(m, nn.Linear) and id(m.weight) in weights and key in ctx.shapes:
                ctx.drop(key, equal_to=ctx.key(f"{weights[id(m.weight)]}.trainable_tokens_delta"))
        return ctx.imported([ctx.rule("reparameterize", table)], tensors)

    # --- beside LoRA: LoraConfig(trainable_token_indices=...) ---------------------------
    # HF PEFT keeps these rows in a TrainableTokensWrapper (tensor
    # ``<embedding>.token_adapter.trainable_tokens_delta``) and ties the head to
    # the input embedding itself, saving nothing for it.
    beside_types = ("LORA",)
    beside_keys = ("trainable_token_indices",)
    _BESIDE = "token_adapter.trainable_tokens_delta"

    @staticmethod
    def _input_embedding(model, modules) -> str | None:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        return next((n for n, m in modules.items() if emb is not None and m is emb), None)

    def to_hf_peft_beside(self, rules, ctx, main):
        indices, tensors = {}, {}
        for rule in rules:
            for target in rule.targets:
                if target in rule.options.tied_heads:
                    continue
                indices[target] = list(rule.options.token_indices)
                tensors[ctx.key(f"{target}.{self._BESIDE}")] = \
                    rule.tensor(f"{target}.trainable_tokens_delta")
        emb = None if ctx.model is None else \
            self._input_embedding(ctx.model, dict(ctx.model.named_modules()))
        if emb is not None and list(indices) == [emb]:
            value = indices[emb]  # the list form: HF PEFT targets the input embedding
        else:  # the dict form: HF PEFT picks modules whose name ends with the key
            for target in indices:
                clash = [n for n in ctx.module_names if n != target and n.endswith(target)]
                if clash:
                    ctx.refuse(f"cannot export: trainable_token_indices key '{target}' would "
                               f"also pick '{clash[0]}' under HF PEFT's suffix rule")
            value = indices
        return ctx.part(main.peft_type, {"trainable_token_indices": value}, tensors)

    def from_hf_peft_beside(self, config, ctx):
        value = ctx.get("trainable_token_indices", "int-list|int-list-dict")
        if isinstance(value, list):
            emb = self._input_embedding(ctx.model, ctx.modules)
            if emb is None:  # HF PEFT's fallback name
                emb = next((n for n in ctx.modules if n.endswith("embed_tokens")), None)
            if emb is None:
                ctx.refuse("cannot import: trainable_token_indices is a list, but this model "
                           "has no input embedding (get_input_embeddings) to put them on")
            targets = {emb: value}
        else:
            targets = {}
            for key, idx in value.items():
                hits = [n for n in ctx.modules if n.endswith(key)]
                if not hits:
                    ctx.refuse(f"cannot import: trainable_token_indices key '{key}' names no "
                               "module of this model")
                targets.update(dict.fromkeys(hits, idx))
        groups: dict[tuple[int, ...], list[str]] = {}
        for name, idx in targets.items():
            if not idx:
                ctx.refuse(f"cannot import: trainable_token_indices for '{name}' is empty")
            groups.setdefault(tuple(idx), []).append(name)
        rules, tensors = [], {}
        for idx, names in groups.items():
            modules, _ = ctx.selectors(names, allow_exclude=False)
            rules.append(ctx.rule("reparameterize", {
                "method": "trainable-tokens", "modules": modules, "token_indices": list(idx)},
                "HF PEFT's trainable_token_indices, beside LoRA"))
        weights = {id(ctx.modules[t].weight): t for t in targets
                   if getattr(ctx.modules[t], "weight", None) is not None}
        for name in targets:
            tensors[f"{name}.trainable_tokens_delta"] = (ctx.key(f"{name}.{self._BESIDE}"), None)
        for name, m in ctx.modules.items():  # a tied head's copy, if a writer saved one
            if isinstance(m, nn.Linear) and id(m.weight) in weights and name not in targets:
                ctx.drop(ctx.key(f"{name}.{self._BESIDE}"),
                         equal_to=ctx.key(f"{weights[id(m.weight)]}.{self._BESIDE}"))
        return ctx.imported(rules, tensors)
