"""Helpers that several test files share: a random adapter file, and the real
SmolLM2 with a few chats encoded by its own chat template."""

from __future__ import annotations

from pathlib import Path

import torch

import peftspec


def make_adapter(source, spec_text: str, path: Path, seed: int, registry,
                 scale: float = 0.5) -> Path:
    """An adapter whose every trainable tensor is random (so it changes the output)."""
    model = registry.load_model(source)
    peftspec.apply(peftspec.parse_spec(spec_text), model, registry=registry)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.copy_(p + torch.randn(p.shape, generator=gen) * scale)
    peftspec.save_adapter(model, path)
    return path


def smollm2_chats(native: bool):
    """``(items, model)``: four short chats encoded (max 256, scored on the
    assistant) and SmolLM2, the native model training uses or transformers'."""
    from peftspec.data.encoding import encode_lm
    from peftspec.data.records import parse
    from peftspec.models import native as native_source
    from peftspec.models.tokenizer import tokenizer_of_source

    tok = tokenizer_of_source("smollm2")
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("Where is Marrowgate?", "In Brindlecombe."), ("2+2?", "4"),
                          ("Name a colour.", "Blue, the colour of the lake."),
                          ("Who founded it?", "Elias Fenwright, a clockmaker.")]]
    items, _ = encode_lm([parse({"messages": c}, f"x:{i}") for i, c in enumerate(chats)],
                         tok, 256)
    model = native_source.load_for_training("smollm2") if native else \
        peftspec.build_registry().load_model("smollm2")
    return items, model
