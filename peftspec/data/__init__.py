"""Training data: example records read from files (``examples``: JSONL and
plain text, with file and line in every error), encoded to token ids and label
masks, split and batched.

Imports: :mod:`peftspec.core` and the layers beside it (formats, models); used
by training, generation and the study.
"""
