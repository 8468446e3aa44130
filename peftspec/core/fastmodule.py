"""``nn.Module.__init__`` at a fraction of its cost, for modules built by the thousand.

``nn.Module.__init__`` sets seventeen attributes through ``object.__setattr__``
one call at a time; a spec that patches every linear layer of a deep model
builds thousands of modules, and that alone took a tenth of ``apply``. This
sets the very same attributes, fresh empty containers and constants read off a
real ``nn.Module()`` when peftspec is imported, with one ``dict.update`` and a
store per container. If a
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
    """``vars(nn.Module())`` with ``None`` for each fresh container, in torch's key
    order, and the containers' (key, type); ``None`` where anything else is held."""
    if getattr(nn.Module, "call_super_init", False):
        return None
    full, factories = {}, []
    for key, value in vars(nn.Module()).items():
        if type(value) in (dict, OrderedDict, set) and not value:
            factories.append((key, type(value)))
            full[key] = None
        elif value is None or type(value) is bool:
            full[key] = value
        else:
            return None
    return full, tuple(factories)


_TEMPLATE = _template()

# The containers torch 2.x's nn.Module.__init__ makes, in its order: where a
# torch makes exactly these, init_module makes them without a loop.
_TORCH_2_CONTAINERS = (
    ("_parameters", dict), ("_buffers", dict), ("_non_persistent_buffers_set", set),
    ("_backward_pre_hooks", OrderedDict), ("_backward_hooks", OrderedDict),
    ("_forward_hooks", OrderedDict), ("_forward_hooks_with_kwargs", OrderedDict),
    ("_forward_hooks_always_called", OrderedDict), ("_forward_pre_hooks", OrderedDict),
    ("_forward_pre_hooks_with_kwargs", OrderedDict), ("_state_dict_hooks", OrderedDict),
    ("_state_dict_pre_hooks", OrderedDict), ("_load_state_dict_pre_hooks", OrderedDict),
    ("_load_state_dict_post_hooks", OrderedDict), ("_modules", dict))
_KNOWN_LAYOUT = _TEMPLATE is not None and _TEMPLATE[1] == _TORCH_2_CONTAINERS


def init_module(module: nn.Module) -> None:
    """Initialise ``module`` as ``nn.Module.__init__(module)`` would (no arguments)."""
    if _TEMPLATE is None:
        nn.Module.__init__(module)
        return
    full, factories = _TEMPLATE
    d = module.__dict__
    d.update(full)  # every key at once, in torch's order: the dict is sized once
    if _KNOWN_LAYOUT:  # the same as the loop below, a fifth faster
        d["_parameters"] = {}
        d["_buffers"] = {}
        d["_non_persistent_buffers_set"] = set()
        d["_backward_pre_hooks"] = OrderedDict()
        d["_backward_hooks"] = OrderedDict()
        d["_forward_hooks"] = OrderedDict()
        d["_forward_hooks_with_kwargs"] = OrderedDict()
        d["_forward_hooks_always_called"] = OrderedDict()
        d["_forward_pre_hooks"] = OrderedDict()
        d["_forward_pre_hooks_with_kwargs"] = OrderedDict()
        d["_state_dict_hooks"] = OrderedDict()
        d["_state_dict_pre_hooks"] = OrderedDict()
        d["_load_state_dict_pre_hooks"] = OrderedDict()
        d["_load_state_dict_post_hooks"] = OrderedDict()
        d["_modules"] = {}
        return
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


def all_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` once, as ``model.modules()`` but in no set order and
    without building each one's dotted name (three times as fast on a deep model)."""
    seen = {id(model)}
    out = [model]
    for module in out:  # grows as it goes: a breadth-first walk
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
    return out


def parameter(t: torch.Tensor) -> nn.Parameter:
    """``nn.Parameter(t)`` (trainable): for a plain tensor the very call
    ``Parameter.__new__`` makes, without its Python checks (a microsecond, per
    parameter of thousands of modules); anything else goes through it."""
    if type(t) is not torch.Tensor:
        return nn.Parameter(t)
    return torch.Tensor._make_subclass(nn.Parameter, t, True)
