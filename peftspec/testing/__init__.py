"""A conformance kit for method plugins: call it from your plugin's tests.

::

    from peftspec.testing import check_method
    import my_plugin

    def test_conformance():
        check_method(my_plugin, '''
            [[augment]]
            method = "my-method"
            modules = ["**.v_proj"]
            ''')                                   # the built-in model
        check_method(my_plugin, RULE_FOR_GPT2, model=make_gpt2, inputs=ids)

The plugin is registered in-process (``build_registry(autoload=False,
plugins=[plugin])``, so it need not be installed) beside the built-ins. Every
promise peftspec makes about an adapter is checked, on the built-in model or
on any model you pass; each check is reported, and :class:`ConformanceError`
(an ``AssertionError``) lists every one that failed:

* ``count_params``: the plan's count equals the parameters ``adapter_params()``
  exposes, and exactly those (plus ``[[train]]`` picks) are trainable;
* ``unchanged_at_apply``: outputs equal the base's, exactly, where the method
  claims it (``Method.unchanged_at_apply``);
* ``frozen_base``: base parameters are the same objects under the same names,
  and bit-identical through optimizer steps (AdamW), which do change the
  adapter;
* ``modules``: every module apply built is a whole ``nn.Module`` (all that
  ``nn.Module.__init__`` sets, no container shared with another module): what
  the fast-path helpers ``init_module`` / ``parameter`` must give;
* ``save_load``: the saved file recreates the trained outputs exactly on a fresh
  base;
* ``buffers``: every buffer the adapter adds comes back from save and load the
  same (a persistent one from the file, a non-persistent one recomputed by
  ``apply``, under another random seed), and none stays when it is off
  (skipped when it adds none);
* ``switching``: two adapters, ``use`` / ``disabled`` give each one's outputs
  and the base's, exactly;
* ``rows``: a per-row batch equals each row run alone (skipped where the method
  says it does not support per-row batches);
* ``remove``: the original modules, tensors, ``requires_grad`` flags and
  outputs come back, exactly;
* ``merge``: merged outputs equal unmerged ones when every method is
  ``mergeable``, and merge refuses otherwise;
* ``hf_peft``: export to HF PEFT's format and import back gives the same
  outputs, when the method declares HF PEFT support (and, for transformers
  models with ``peft`` installed, ``PeftModel.from_pretrained`` agrees).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import peftspec
from peftspec.models.nanogpt import GPT, GPTConfig
from peftspec.testing.checks import Checks, runner
from peftspec.testing.report import CHECKS, ConformanceError, Report, Result

__all__ = ["CHECKS", "ConformanceError", "Report", "Result", "check_method", "default_model"]


def default_model() -> nn.Module:
    """The kit's default base: a small built-in nanoGPT."""
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


def check_method(plugin: object | None, rule: str, *, model: nn.Module | Callable | None = None,
                 inputs: Any = None, registry=None, steps: int = 3, lr: float = 1e-2,
                 seed: int = 0, atol: float = 1e-5, raise_on_failure: bool = True) -> Report:
    """Run every conformance check of the methods in ``rule`` (TOML: one or more rules).

    Args:
        plugin: the plugin module or object (registered in-process beside the
            built-ins), or ``None`` to use ``registry`` (default: the installed
            plugins).
        model: a factory returning a fresh base model, or a model (deep-copied for
            each fresh base); default: a small built-in nanoGPT.
        inputs: what to feed the model: a tensor (``model(x)``), a dict
            (``model(**x)``), or a callable ``f(model) -> output``; default: token
            ids of shape (3, 10) for the built-in model. Row-sliceable inputs with
            three or more rows also exercise per-row batches.
        steps, lr: AdamW steps for the frozen-base check.
        atol: tolerance where results are equal only up to float rounding
            (merge, per-row, HF PEFT); everything else is compared exactly.
        raise_on_failure: raise :class:`ConformanceError` listing failed checks.
    """

    if registry is None:
        registry = (peftspec.build_registry(autoload=False, plugins=[plugin]) if plugin
                    is not None else peftspec.get_registry())
    if model is None:
        factory = default_model
    elif isinstance(model, nn.Module):
        factory = lambda: copy.deepcopy(model)  # noqa: E731
    else:
        factory = model
    if inputs is None:
        inputs = torch.randint(0, 257, (3, 10), generator=torch.Generator().manual_seed(seed))
    run = runner(inputs)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="peftspec-conformance-") as tmp:
        Checks(peftspec, registry, rule, factory, run, inputs, steps, lr, seed, atol,
                Path(tmp), report).run_all()
    if raise_on_failure and report.failures:
        raise ConformanceError(report)
    return report
