"""Deprecated alias of :mod:`peftspec.core.packed` (moved after 0.1.0; this name goes in
the next release). Plugin authors: import from :mod:`peftspec.plugin_api`."""

from peftspec.core.deprecation import moved_module

__getattr__ = moved_module("peftspec.frozen", "peftspec.core.packed")
