"""The cache API is found by capability: the forward signature and the classes'
own attributes, never a version string; what peftspec cannot read is an error
naming the model class and the installed transformers version."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import peftspec
from peftspec_plugins.prompts import kv_cache


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 8)

    def get_input_embeddings(self):
        return self.wte


class NewStyle(Embedder):  # transformers >= 5.24 spelling
    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None,
                use_cache=None):
        return {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "mask": attention_mask}


class OldStyle(Embedder):  # transformers <= 5.23 spelling
    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None,
                past_key_values=None, use_cache=None):
        return {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "mask": attention_mask}


class NoCacheArg(Embedder):  # caches, but under a name peftspec does not know
    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, kv_state=None,
                use_cache=None):
        return inputs_embeds


NoCacheArg.__module__ = "transformers.models.fake.modeling_fake"  # as a transformers class


def test_cache_argument_is_read_off_the_signature():
    assert kv_cache.cache_arg(inspect.signature(NewStyle().forward)) == "cache"
    assert kv_cache.cache_arg(inspect.signature(OldStyle().forward)) == "past_key_values"
    assert kv_cache.cache_arg(inspect.signature(NoCacheArg().forward)) is None


def test_a_model_whose_cache_cannot_be_reached_is_refused_naming_class_and_version():
    spec = peftspec.parse_spec('[prefix]\nmethod = "prompt-tuning"\ntokens = 2\n', file="p.toml")
    with pytest.raises(peftspec.SpecError) as info:
        peftspec.compile_plan(spec, NoCacheArg())
    msg = str(info.value)
    assert "NoCacheArg (transformers " in msg and "'past_key_values', 'cache'" in msg
    assert kv_cache.transformers_version() in msg


@pytest.mark.parametrize("model", [NewStyle(), OldStyle()], ids=["cache", "past_key_values"])
def test_prompt_tuning_sees_decoding_steps_under_either_name(model):
    spec = peftspec.parse_spec('[prefix]\nmethod = "prompt-tuning"\ntokens = 2\n', file="p.toml")
    peftspec.apply(spec, model)
    arg = kv_cache.cache_arg(inspect.signature(model.forward))
    ids = torch.tensor([[1, 2, 3]])
    first = model(input_ids=ids, attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert first["input_ids"] is None and first["inputs_embeds"].shape == (1, 5, 8)
    assert first["mask"].shape == (1, 5)  # the prompt in front
    past = [(torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4))]  # 5 positions cached
    step = model(input_ids=torch.tensor([[4]]), attention_mask=torch.ones(1, 4,
                 dtype=torch.long), **{arg: past}, use_cache=True)
    # a decoding step: the prompt is in the cache, not prepended again; mask covers it
    assert step["inputs_embeds"] is None and step["input_ids"].shape == (1, 1)
    assert step["mask"].shape == (1, 6)


def test_an_unknown_cache_object_is_an_error_not_a_guess():
    with pytest.raises(kv_cache.CacheAPIError, match="NoCacheArg .*cannot read"):
        kv_cache.cache_len(object(), NoCacheArg())
    assert kv_cache.cache_len(None, NoCacheArg()) == 0
    assert kv_cache.cache_len([(torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4))],
                              NoCacheArg()) == 7
