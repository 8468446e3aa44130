"""``nn.Module.__init__`` at a fraction of its cost, for modules built by the thousand.

``nn.Module.__init__`` sets seventeen attributes through ``object.__setattr__``
one call at a time; a spec that patches every linear layer of a deep model
builds thousands of modules, and that alone took a tenth of ``apply``. This
sets the very same attributes, fresh empty containers and constants read off a
real ``nn.Module()`` when peftspec is imported, with one ``dict.update``. If a
torch version's ``nn.Module`` holds anything else at init, or asks its
subclasses to call ``super().__init__`` further, it falls back to the real one.

:func:`gc_paused` keeps the cyclic garbage collector out of the same bulk work.
"""

from __future__ import annotations

import functools
import gc
from collections import OrderedDict

import torch
from torch import nn


def _template():
    if getattr(nn.Module, "call_super_init", False):
        return None
    constants, factories = {}, []
    for key, value in vars(nn.Module()).items():
        if type(value) in (dict, OrderedDict, set) and not value:
            factories.append((key, type(value)))
        elif value is None or type(value) is bool:
            constants[key] = value
        else:
            return None
    return constants, tuple(factories)


_TEMPLATE = _template()


def init_module(module: nn.Module) -> None:
    """Initialise ``module`` as ``nn.Module.__init__(module)`` would (no arguments)."""
    if _TEMPLATE is None:
        nn.Module.__init__(module)
        return
    constants, factories = _TEMPLATE
    d = module.__dict__
    d.update(constants)
    for key, factory in factories:
        d[key] = factory()


def gc_paused(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused (restored after, also
    on error; a no-op where it is paused already).

    Compiling and applying a plan on a deep model allocate tens of thousands of
    small containers (steps, modules, their dicts) and free almost none: every
    700 allocations the collector would scan young objects that all survive,
    and now and then the whole model, about a tenth of ``apply``'s time. Nothing
    cyclic is left behind that reference counting would not free anyway; the
    collector runs on its own schedule after."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return paused


def parameter(t: torch.Tensor) -> nn.Parameter:
    """``nn.Parameter(t)`` (trainable): for a plain tensor the very call
    ``Parameter.__new__`` makes, without its Python checks (a microsecond, per
    parameter of thousands of modules); anything else goes through it."""
    if type(t) is not torch.Tensor:
        return nn.Parameter(t)
    return torch.Tensor._make_subclass(nn.Parameter, t, True)
