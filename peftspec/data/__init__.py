"""Training data: the files people have, into scored token ids and batches.

``readers`` (JSONL, JSON, CSV/TSV, Parquet, Arrow, datasets folders, text:
``(where, record)`` pairs), ``records`` (a record checked into an
``Example``), ``reading`` (files into examples, every bad record reported),
``chat`` (conversations through the model's chat template, the scored spans),
``encoding`` (ids, labels, truncation and its counts), ``examples`` (labels of
a classifier, batches, splits), ``packing`` (rows of whole examples),
``index`` (an offset index over JSON Lines files) and ``stream`` (batches read
and tokenized on a worker as training goes), ``inspect`` (``peftspec data
inspect``).
docs/data.md is the user's side of it.

Imports: :mod:`peftspec.core` and the layers beside it (formats, models); used
by training, generation and the study.
"""
