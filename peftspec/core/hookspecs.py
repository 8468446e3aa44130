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
    Its optional capabilities (merge, training hooks, initialisation from
    data, per-row batches, state shared by a rule's modules) are protocols of
    :mod:`peftspec.core.capabilities`, declared by implementing them.

    A freeze method (``[[freeze]]``: how the frozen base is stored, e.g. HQQ or
    GPTQ) is a :class:`peftspec.core.method.FreezeMethod` registered the same way:
    its ``pack(weight, step)`` returns a :class:`peftspec.core.packed.PackedWeight`
    whose codec dequantizes on each matmul.
    """


@hookspec
def register_hf_peft_codecs(register):
    """Register HF PEFT codecs: call ``register(codec)`` once per codec.

    ``codec`` is an instance of a :class:`peftspec.plugin_api.HFPeftCodec`
    subclass whose ``method`` names an installed method (any plugin's, this
    one's or another's); it converts that method's rules to and from HF PEFT's
    format (``peftspec export`` / ``import``, see
    :mod:`peftspec.formats.hf_peft.codec`). One codec per method: a second is
    reported against the plugin that registered it, as a method clash is.
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
