"""Training memory, full fine-tuning against a spec: the ``peftspec memory`` table.

Exact, from each parameter's ``numel`` and dtype (tied parameters counted once):

* weights: every parameter of the model (for the spec: the base plus the
  adapter's new parameters);
* gradients: one tensor like each trainable parameter;
* optimizer states: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` like each
  trainable parameter, plus a float32 ``step`` scalar (4 bytes) per parameter.

Estimated, for a decoder of L layers, hidden width h, a heads, vocabulary V, at
batch b, sequence length s and p bytes per activation element (4 for fp32,
2 for bf16 autocast), after Korthikanti et al. 2022 ("Reducing activation
recomputation in large transformer models"), whose 16-bit count is
``s·b·h·(34 + 5·a·s/h)`` bytes per layer:

* per layer: ``p/2 · s·b·h·(34 + 5·a·s/h)``;
* plus the embedding output ``s·b·h·p`` and the logits with their float32
  copy and gradient for the loss ``s·b·V·(p + 8)``;
* with gradient checkpointing, only each layer's input is kept
  (``L·s·b·h·p``) plus one layer's full activations while it is recomputed.

Activations are about the same for full fine-tuning and for a spec: a frozen
layer still keeps its inputs to pass gradients down to trainable parameters
below it. Soft prompts add their virtual tokens to s (prefix tuning's only
lengthen keys and values, so counting them in s over-estimates a little).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

from torch import nn
from peftspec.core.packed import stored_bytes


def _unique_params(model: nn.Module, trainable_only: bool = False):
    seen = set()
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        yield p


def tensor_bytes(params) -> int:
    """Bytes the tensors occupy: a weight ``[[freeze]]`` packed (nf4, int8, bf16)
    counts what it stores, not its float shape."""

    return sum(stored_bytes(p) for p in params)


def adamw_state_bytes(params) -> int:
    """``exp_avg`` + ``exp_avg_sq`` like each parameter, and a float32 ``step``."""
    params = list(params)
    return 2 * tensor_bytes(params) + 4 * len(params)


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int
    vocab: int


def model_dims(model: nn.Module) -> Dims | None:
    """Layers, width, heads and vocabulary from the model's config, if it says them."""
    cfg = getattr(model, "config", None)

    def first(*keys):
        for k in keys:
            v = getattr(cfg, k, None)
            if isinstance(v, int):
                return v
        return None

    layers = first("n_layer", "num_hidden_layers", "num_layers")
    hidden = first("n_embd", "hidden_size", "d_model")
    heads = first("n_head", "num_attention_heads")
    vocab = first("vocab_size")
    if vocab is None and callable(getattr(model, "get_input_embeddings", None)):
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", None)
    if None in (layers, hidden, heads, vocab):
        return None
    return Dims(layers, hidden, heads, vocab)


def activation_bytes(dims: Dims, batch: int, seq: int, precision: str,
                     checkpointing: bool = False) -> int:
    """The estimate documented above."""
    p = 2 if precision == "bf16" else 4
    s, b, h, a = seq, batch, dims.hidden, dims.heads
    per_layer = p * s * b * h * (34 + 5 * a * s / h) / 2
    layers = dims.layers * s * b * h * p + per_layer if checkpointing \
        else dims.layers * per_layer
    return int(layers + s * b * h * p + s * b * dims.vocab * (p + 8))


def full_finetune(model: nn.Module) -> dict[str, int]:
    """Weights, gradients and AdamW states (bytes) for training every parameter."""
    params = list(_unique_params(model))
    return {"weights": tensor_bytes(params), "gradients": tensor_bytes(params),
            "optimizer": adamw_state_bytes(params), "params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params)}


def with_spec(patched: nn.Module) -> dict[str, int]:
    """The same for a patched model: its trainable parameters only."""
    params = list(_unique_params(patched))
    trainable = list(_unique_params(patched, trainable_only=True))
    return {"weights": tensor_bytes(params), "gradients": tensor_bytes(trainable),
            "optimizer": adamw_state_bytes(trainable),
            "params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in trainable)}


def memory_table(base: dict, spec: dict, dims: Dims | None, *, batch: int, seq: int,
                 precision: str, checkpointing: bool, spec_extra_tokens: int = 0) -> dict:
    """Both columns with activations and totals (bytes; activations None when unknown).

    ``spec_extra_tokens``: virtual tokens the spec's soft prompts add to each
    sequence (its activations are estimated at ``seq + spec_extra_tokens``)."""
    acts = {name: activation_bytes(dims, batch, seq + extra, precision, checkpointing)
            if dims else None for name, extra in (("full", 0), ("spec", spec_extra_tokens))}
    table = {}
    for name, col in (("full", base), ("spec", spec)):
        act = acts[name]
        row = dict(col, activations=act)
        row["total"] = col["weights"] + col["gradients"] + col["optimizer"] + (act or 0)
        table[name] = row
    return {"columns": table, "batch_size": batch, "seq_len": seq, "precision": precision,
            "spec_extra_tokens": spec_extra_tokens,
            "gradient_checkpointing": checkpointing,
            "dims": dims.__dict__ if dims else None}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's ``VmHWM`` (from ``/proc/self/status``), which starts afresh at
    exec; ``ru_maxrss`` instead carries a parent's peak over fork and exec, so a
    run launched from a notebook that once held 2 GB would report 2 GB. Where
    there is no ``/proc``, ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
