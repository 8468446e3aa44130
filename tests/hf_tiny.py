"""Tiny randomly initialised transformers models (seed 0, eval mode), shared by the
tests that compare a method with HF PEFT's: GPT-2 (Conv1D projections, a head
tied to the embedding) and Llama (GQA 4/2 heads)."""

from __future__ import annotations

import torch


def gpt2():
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


def llama():
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100)).eval()
