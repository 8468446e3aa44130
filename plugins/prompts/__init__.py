"""Soft prompts: prompt tuning, P-tuning and prefix tuning (the ``[prefix]`` section).

* ``prompt-tuning`` (Lester et al. 2021): ``tokens`` trainable embeddings are
  prepended to the input embeddings.
* ``p-tuning`` (Liu et al. 2021): the virtual-token embeddings come from a
  small MLP or LSTM prompt encoder; on save the encoder's *output* is stored,
  so inference needs no encoder.
* ``prefix-tuning`` (Li & Liang 2021): ``tokens`` key/value prefixes per
  layer, optionally produced by an MLP (``projection``), handed to the model
  as its cache (transformers models) or ``past_key_values`` (the default
  model).

A forward pre-hook on the whole model rewrites its inputs: ``input_ids``
become ``inputs_embeds`` with the prompt in front, the attention mask gets
``tokens`` leading ones, labels get ``tokens`` leading -100s (so the loss
ignores the virtual tokens), ``token_type_ids`` leading zeros, and explicit
``position_ids`` are shifted so the real tokens sit after the prompt. On a
cached decoding step the prompt is already in the cache: only the mask and
positions are adjusted. So ``generate()`` works with and without the cache,
batched and left-padded. Trainable counts and tensor layouts follow HF PEFT.

The package: :mod:`.options`, :mod:`.modules` (the table and the encoders),
:mod:`.models` (what a soft prompt needs from a model, one view per model
family), :mod:`.rewriter` (the input-rewriting hook), :mod:`.kv_cache`
(transformers' cache objects across versions) and :mod:`.methods`. HF PEFT's
format is the codec ``peftspec_plugins.hf_peft.prompts``.
"""

from __future__ import annotations

from peftspec.plugin_api import hookimpl

from .methods import PrefixTuning, PromptTuning, PTuning, SoftPromptMethod
from .models import CHILD, find_embedding, kv_geometry
from .modules import SoftPrompt
from .options import PrefixTuningOptions, PromptTuningOptions, PTuningOptions

__all__ = ["CHILD", "PTuning", "PTuningOptions", "PrefixTuning", "PrefixTuningOptions",
           "PromptTuning", "PromptTuningOptions", "SoftPrompt", "SoftPromptMethod",
           "find_embedding", "kv_geometry"]


@hookimpl
def register_methods(register):
    register(PromptTuning())
    register(PTuning())
    register(PrefixTuning())
