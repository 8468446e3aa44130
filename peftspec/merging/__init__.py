"""Adapters folded into weights: ``stream`` merges an adapter into a base
checkpoint module by module without loading the whole model, ``combine`` and
``combine_math`` make one adapter out of several (linear, cat, svd, ties, dare).

An application: imports the core, formats and models, never the CLI.
"""
