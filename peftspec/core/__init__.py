"""The core: what a spec means and what applying it does to a model.

The spec model (``spec``, ``tomlpos``, ``tomlerrors``), selectors (``matching``,
``saferegex``), method options (``options``), the method contract (``step``,
``method``), plugins (``hookspecs``, ``registry``), the compiler (``plan``), the
apply transaction (``state``, ``patching``, ``freeze``, ``packed``,
``promise``, ``rows``), errors, and small IO helpers that depend on nothing.

Imports: torch, pluggy and the standard library only; never a format, a model
source, training, the CLI, or the package root (docs/ARCHITECTURE.md).
"""
