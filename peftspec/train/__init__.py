"""Training a spec's adapter: ``peftspec train`` and its Python entry point.

Modules, one job each (the options themselves are
:mod:`peftspec.core.train_config`, which the spec loader reads; the data
readers :mod:`peftspec.data.examples`; the tokenizers :mod:`peftspec.models.tokenizer`):

* :mod:`.tasks`: causal LM or sequence classification, as the data says (the
  classifier's model, its head, labels and accuracy);
* :mod:`.schedule`: the learning-rate schedule (warmup, cosine), a pure function of the step;
* :mod:`.optim`: AdamW over the adapter's parameters, LoRA+ groups by role;
* :mod:`.hooks`: the methods' training hooks and data-driven init (AdaLoRA, EVA);
* :mod:`.grad_checkpoint`: gradient checkpointing for transformers and plain models;
* :mod:`.resume`: resumable training checkpoints (safetensors + JSON, nothing pickled);
* :mod:`.distributed`: torchrun, DDP and FSDP;
* :mod:`.loop`: the training loop itself;
* :mod:`.memory`: the memory table (weights, gradients, optimizer states, activations);
* :mod:`.metrics`, :mod:`.report`: the metrics log, and curves from it.

An application: imports the core, formats, models and data, never the CLI.
"""

from __future__ import annotations

from peftspec.core.train_config import OPTIONS, TrainConfig

__all__ = ["OPTIONS", "TrainConfig"]
