"""The hooks a peftspec plugin may implement. These docstrings are the reference.

A plugin is a module (or object) with functions decorated by
:data:`peftspec.hookimpl`, made known through the ``peftspec`` entry-point
group of its distribution::

    [project.entry-points.peftspec]
    my_method = "my_package.plugin"

Every hook is optional. Hooks take keyword arguments by name; an
implementation may accept any subset of them.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("peftspec")
hookimpl = pluggy.HookimplMarker("peftspec")


@hookspec
def register_methods(register):
    """Register method objects: call ``register(method)`` once per method.

    ``method`` is an instance of a :class:`peftspec.Method` subclass. Its
    ``name`` must be unique across all installed plugins; a clash is reported
    against the plugin that registered second, and that method is ignored.
    Its ``Options`` must be a frozen dataclass; a method that fails these
    checks is reported by the plugin's distribution and the plugin's other
    methods still register. A plugin that registers nothing at all (typically
    this function without ``@hookimpl``) is listed by ``peftspec plugins`` with
    a warning. The contract of a method, hook by hook: ``docs/plugins.md``.
    Among its optional parts: HF PEFT's format (``hf_peft_types``,
    ``to_hf_peft`` / ``from_hf_peft``, and for a method HF PEFT stores inside
    another method's config, ``hf_peft_beside_types`` / ``hf_peft_beside_keys``
    with ``to_hf_peft_beside`` / ``from_hf_peft_beside``), and
    ``init_from_data(model, steps, batches, report)``, which ``peftspec train``
    calls before the first step (LoRA's EVA).

    A freeze method (``[[freeze]]``: how the frozen base is stored, e.g. HQQ or
    GPTQ) is a :class:`peftspec.core.method.FreezeMethod` registered the same way:
    its ``pack(weight, step)`` returns a :class:`peftspec.core.packed.PackedWeight`
    whose codec dequantizes on each matmul.
    """


@hookspec
def register_model_sources(register):
    """Register model sources: ``register(prefix, loader, help)``.

    ``--model PREFIX:REST`` calls ``loader(REST)``, which returns an
    ``nn.Module`` or raises :class:`peftspec.ModelSourceError`. The prefix
    ``default`` is used when no model is given.

    A loader that accepts a ``num_labels`` keyword can build a sequence
    classifier (``peftspec train`` on ``{"text", "label"}`` data calls
    ``loader(REST, num_labels=N)``): a model taking ``input_ids``,
    ``attention_mask`` and ``labels`` of shape (batch,), returning ``logits``
    (batch, N) and the cross-entropy ``loss``, with a ``num_labels``
    attribute. It should list the names of the head's freshly initialised
    parameters in ``model.peftspec_new_parameters``, so that training refuses
    to leave them frozen.
    """


@hookspec
def check_plan(plan):
    """Validate a compiled plan beyond what each method checks.

    Return a list of problems (:class:`peftspec.Problem` or ``str``) or
    ``None``. Problems of all plugins are gathered into one ``SpecError``.
    """


@hookspec
def after_apply(model, plan):
    """Called after a plan was applied to ``model`` and parameters frozen.

    For post-apply steps that need the whole model. Must not change base
    weights.
    """


@hookspec
def register_commands(cli):
    """Add subcommands to the ``peftspec`` click group ``cli``."""
