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
