"""One answer to "how long may this model's context be", for training and soft prompts."""

from types import SimpleNamespace

import pytest
from torch import nn

from peftspec.core.modelinfo import context_length
from peftspec.plugin_api import GPT, GPTConfig


def _with(**config):
    model = nn.Linear(1, 1)
    model.config = SimpleNamespace(**config)
    return model


@pytest.mark.parametrize("config, expected", [
    ({"max_position_embeddings": 2048}, 2048),   # Llama
    ({"n_positions": 1024}, 1024),                # GPT-2
    ({"block_size": 64}, 64),                     # nanoGPT
    ({"max_position_embeddings": 0}, None),       # not a length
    ({"n_positions": True}, None),                # a bool is no length
    ({}, None),
])
def test_context_length_reads_the_config(config, expected):
    assert context_length(_with(**config)) == expected


def test_the_built_in_model_and_a_plain_module():
    assert context_length(GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=1,
                                         n_embd=8))) == 32
    assert context_length(nn.Linear(2, 2)) is None
