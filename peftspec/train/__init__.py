"""Training a spec's adapter: ``peftspec train`` and its Python entry point.

Modules, one job each:

* :mod:`.config`: the options and their schema (no torch; the spec loader uses it);
* :mod:`.tokenizer`: the byte-level tokenizer of the default model, and hf: tokenizers;
* :mod:`.data`: JSONL / text files into token ids, labels and batches;
* :mod:`.tasks`: causal LM or sequence classification, as the data says (the
  classifier's model, its head, labels and accuracy);
* :mod:`.schedule`: the learning-rate schedule (warmup, cosine), a pure function of the step;
* :mod:`.checkpointing`: gradient checkpointing for transformers and plain models;
* :mod:`.checkpoint`: resumable training checkpoints (safetensors + JSON, nothing pickled);
* :mod:`.loop`: the training loop itself;
* :mod:`.memory`: the memory table (weights, gradients, optimizer states, activations);
* :mod:`.report`: loss and learning-rate curves from a metrics log.

This package imports torch lazily: ``peftspec.core.spec`` imports :mod:`.config`.
"""

from __future__ import annotations

from peftspec.core.train_config import OPTIONS, TrainConfig

__all__ = ["OPTIONS", "TrainConfig"]
