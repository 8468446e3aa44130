"""``peftspec compare``: several specs trained alike, measured side by side.

Choosing a PEFT method is weighing trade-offs: parameters trained, storage,
training memory, speed, quality, forgetting of what the base knew, and the
cost at inference. This package measures all of them for a list of specs on
one model and one data set, with everything else held equal (data, steps,
batch, seed, warmup-cosine schedule; the peak learning rate is the command's,
unless a spec's ``[train_config]`` sets its own ``lr``, which the table shows):

* :mod:`.settings`: what a comparison holds fixed, and the key that tells a
  finished run from a stale one;
* :mod:`.worker`: one run, in its own process (so its peak memory is its own),
  training through :func:`peftspec.train.loop.train` and measuring around it
  (:mod:`.measure`); it writes its record atomically when it has finished;
* :mod:`.runner`: the parent, which launches the workers one after the other,
  reads back the records of finished runs instead of repeating them, shows
  progress, and writes ``results.json``;
* :mod:`.table` and :mod:`.figures`: the terminal table and the PNG figures,
  both drawn from the records alone (``peftspec compare --report DIR``).
"""

from __future__ import annotations

from peftspec.compare.settings import CompareError, Entry, Settings  # noqa: F401
