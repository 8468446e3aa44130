"""peftspec -> llama.cpp: write a LoRA adapter as a llama.cpp LoRA adapter GGUF.

The file loads in llama.cpp (``llama-cli -m base.gguf --lora adapter.gguf``)
and in Ollama (a Modelfile's ``ADAPTER`` line) on top of the GGUF the base
model came from. It follows llama.cpp's own converter (``convert_lora_to_gguf.py``)
and loader (``src/llama-adapter.cpp``):

* metadata ``general.type = "adapter"``, ``adapter.type = "lora"``,
  ``adapter.lora.alpha`` (float32), ``general.architecture`` (the loader
  refuses an adapter whose architecture differs from the base's);
* for each adapted weight ``W`` (llama.cpp's tensor name, e.g.
  ``blk.3.attn_q.weight``) two tensors ``W.lora_a`` and ``W.lora_b``. llama.cpp
  computes ``W·x + (alpha/r)·B·(A·x)`` with ``r`` read from ``lora_b``'s shape, so
  ``lora_a`` is ``A`` (r × in) and ``lora_b`` is ``B`` (out × r), as torch holds
  them. For ``token_embd`` llama.cpp looks rows up in ``lora_a``, so there
  ``lora_a`` is ``Aᵀ`` (vocab × r) and ``lora_b`` is ``B`` (dim × r);
* llama.cpp's converter stores Llama's q and k projections with their rows
  permuted (rotary pairs interleaved instead of split in halves; its
  ``LlamaModel.permute`` with ``n_head``, or ``n_head_kv`` for k). A LoRA update
  ``B·A`` of those weights must be permuted the same way; only ``B`` holds rows,
  so ``B`` is permuted (:func:`permute_rows`) and ``A`` is not.

llama.cpp has one ``alpha`` per file and takes ``r`` from each tensor, so its
scale is ``alpha/r``. peftspec's scale per rule is ``alpha/r`` or, with
``rslora``, ``alpha/sqrt(r)``; rules may differ. The file's alpha is the first
rule's ``scale·r`` (its own ``alpha`` for plain LoRA) and every rule whose
``scale·r`` differs has ``B`` multiplied by ``scale·r/alpha``: the product
``(alpha/r)·B'·A`` is then exactly peftspec's ``scale·B·A``.

What a llama.cpp LoRA adapter cannot hold is refused, naming the rule (a
:class:`~peftspec.core.errors.ConversionError`, exit code 2): DoRA's magnitudes,
methods other than LoRA (bottleneck adapters, IA3...), soft prompts, ``[[train]]``
rules (BitFit biases, whole modules), modules without a llama.cpp tensor
name, and LoRA on the embedding or output of a model whose two are tied
(llama.cpp uses one tensor for both and would apply the update to both).
Only Llama-architecture causal LMs are supported (``LlamaForCausalLM``: SmolLM2,
Llama 2/3, TinyLlama...).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from peftspec.formats.adapter_file import checked_plan, atomic_write_bytes, read_metadata
from peftspec.core.errors import ConversionError
from peftspec.formats.gguf_file import gguf_bytes
from peftspec.formats.hf_peft.folder import read_tensors
from peftspec.core.patching import base_view
from peftspec.core.registry import registry_or_default

ARCHITECTURES = {"LlamaForCausalLM": "llama"}
"""The transformers classes peftspec exports, and llama.cpp's architecture name."""

_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
_LAYER_NAMES = {("self_attn", "q_proj"): "attn_q", ("self_attn", "k_proj"): "attn_k",
                ("self_attn", "v_proj"): "attn_v", ("self_attn", "o_proj"): "attn_output",
                ("mlp", "gate_proj"): "ffn_gate", ("mlp", "up_proj"): "ffn_up",
                ("mlp", "down_proj"): "ffn_down"}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "lm_head": "output"}
OUTTYPES = {"f32": torch.float32, "f16": torch.float16}
_FILE_TYPES = {torch.float32: 0, torch.float16: 1}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16


def gguf_tensor_name(module: str) -> str | None:
    """llama.cpp's name for the weight of the Llama module at ``module``
    (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``), or None."""
    if module in _TOP_NAMES:
        return _TOP_NAMES[module] + ".weight"
    m = _LAYER.fullmatch(module)
    if m and (m[2], m[3]) in _LAYER_NAMES:
        return f"blk.{m[1]}.{_LAYER_NAMES[m[2], m[3]]}.weight"
    return None


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order from HF's: within each of ``n_head`` heads, row
    ``i`` of the first half goes to ``2i`` and row ``i`` of the second half to ``2i+1``
    (the converter's ``LlamaModel.permute``)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConversionError(f"cannot permute {rows} rows into {n_head} heads of rotary pairs")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows` (HF's row order from llama.cpp's)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _refuse(adapter: Path, what: list[str]) -> None:
    if what:
        raise ConversionError(f"{adapter}: cannot export to a llama.cpp LoRA adapter:\n  " +
                              "\n  ".join(what))


def _rule_problem(rule, options) -> str | None:
    where = f"{rule.where} (line {rule.line})" if rule.line else rule.where
    if rule.family == "freeze":  # the base's storage, not the adapter: a plain LoRA pair
        return None
    if rule.family == "train":
        return (f"{where} trains the base's own parameters ([[train]]: BitFit biases, whole "
                "modules); a llama.cpp adapter holds only LoRA pairs. Merge instead "
                "(peftspec merge) and convert the merged model with llama.cpp's "
                "convert_hf_to_gguf.py")
    if rule.family == "prefix":
        return (f"{where} is a soft prompt ('{rule.method}'); llama.cpp adapters have no "
                "virtual tokens")
    if rule.method != "lora":
        return (f"{where} uses method '{rule.method}' ({rule.family}); a llama.cpp adapter "
                "expresses only LoRA (W + s·B·A)")
    if getattr(options, "dora", False):
        return (f"{where} is DoRA (dora = true): its learned per-row magnitudes have no place "
                "in a llama.cpp adapter; use dora = false, or merge (peftspec merge)")
    return None


def _tied(model: nn.Module) -> bool:
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return True
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    return outp is not None and getattr(outp, "weight", None) is getattr(inp, "weight", 0)


def gguf_adapter(adapter: str | Path, model: nn.Module, *, registry=None,
                 dtype: torch.dtype = torch.float32) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of the llama.cpp adapter for the peftspec file ``adapter``
    on the base ``model`` (a module; patched is fine: its base is used)."""
    registry = registry_or_default(registry)
    adapter = Path(adapter)
    read_metadata(adapter)
    with base_view(model):
        plan = checked_plan(model, adapter, registry)
        cls = type(model).__name__
        tied = _tied(model)
    arch = ARCHITECTURES.get(cls)
    if arch is None:
        raise ConversionError(f"{adapter}: cannot export to a llama.cpp LoRA adapter: the base "
                              f"is a {cls}; peftspec writes llama.cpp adapters for "
                              f"{', '.join(ARCHITECTURES)} (llama.cpp's '"
                              f"{', '.join(ARCHITECTURES.values())}' architecture)")
    cfg = model.config
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head

    problems = [p for r in plan.spec.rules
                if (p := _rule_problem(r, plan.options.get(r.where, r.options)))]
    _refuse(adapter, problems)
    steps = [s for s in plan.steps if s.family == "reparameterize"]
    for s in steps:
        where = f"{s.rule} (line {s.line})" if s.line else s.rule
        if gguf_tensor_name(s.target) is None:
            problems.append(f"{where} adapts '{s.target}', which has no llama.cpp tensor "
                            "name; llama.cpp's Llama adapters cover the q/k/v/o, gate/up/down "
                            "projections, embed_tokens and lm_head")
        elif tied and s.target in _TOP_NAMES:
            problems.append(f"{where} adapts '{s.target}' of a model whose input embedding and "
                            "output are tied; llama.cpp holds one tensor for both and would "
                            "apply the update to both. Leave it out of the rule for export")
    _refuse(adapter, problems)
    if not steps:
        _refuse(adapter, ["the spec has no LoRA rule"])

    # one alpha for the file; llama.cpp's scale is alpha / r of each tensor
    products = [s.options.scale * s.options.r for s in steps]
    alpha = next((p for p in products if p), 1.0)
    alpha = float(torch.tensor(alpha, dtype=torch.float32))  # as the file stores it
    tensors = read_tensors(adapter)
    out: dict[str, torch.Tensor] = {}
    for s, product in zip(steps, products):
        name = gguf_tensor_name(s.target)
        a = tensors[f"{s.target}.lora_A"].float()
        b = tensors[f"{s.target}.lora_B"].float()
        if product != alpha:
            b = b * (product / alpha)  # fold this rule's scale: (alpha/r)·B' = scale·B
        if name.startswith("token_embd."):
            a = a.t()  # looked up by token: vocab × r
        elif name.endswith("attn_q.weight"):
            b = permute_rows(b, n_head)
        elif name.endswith("attn_k.weight"):
            b = permute_rows(b, n_kv)
        out[name + ".lora_a"] = a.contiguous().to(dtype)
        out[name + ".lora_b"] = b.contiguous().to(dtype)
    metadata = {
        "general.architecture": arch,
        "general.type": "adapter",
        "general.name": plan.spec.name or adapter.stem,
        "general.file_type": _FILE_TYPES[dtype],
        "adapter.type": "lora",
        "adapter.lora.alpha": alpha,
    }
    return metadata, out


def export_gguf(adapter: str | Path, out: str | Path, *, model: nn.Module | str,
                registry=None, outtype: str = "f32") -> Path:
    """Write the peftspec adapter file ``adapter`` as a llama.cpp LoRA adapter GGUF.

    Args:
        model: the base model (a module or a ``--model`` string): the adapter is
            checked against it, and its class and head counts decide the
            tensor names and the q/k permutation.
        outtype: ``"f32"`` (default, exact) or ``"f16"`` (half the size).

    Returns ``out``, written atomically. Raises :class:`ConversionError`
    (exit 2) for what llama.cpp cannot express, naming each rule.
    """
    registry = registry_or_default(registry)
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown GGUF outtype '{outtype}'; use one of "
                              f"{', '.join(OUTTYPES)}")
    if model is None:
        raise ConversionError("exporting to GGUF needs the base model (--model): its class "
                              "and head counts decide llama.cpp's tensor names and layout")
    if isinstance(model, str):
        model = registry.load_model(model)
    metadata, tensors = gguf_adapter(adapter, model, registry=registry, dtype=OUTTYPES[outtype])
    out = Path(out)
    if out.is_dir():
        raise ConversionError(f"{out} is a folder; give the GGUF file to write "
                              "(--out adapter.gguf)")
    atomic_write_bytes(out, gguf_bytes(metadata, tensors))
    return out


__all__ = ["ARCHITECTURES", "export_gguf", "gguf_adapter", "gguf_tensor_name", "permute_rows",
           "unpermute_rows"]
