"""What a training run learns, chosen by its data: causal language modelling
or sequence classification.

``{"text"}`` and ``{"prompt", "completion"}`` records (and ``.txt`` files)
train a causal LM. ``{"text", "label"}`` records train a sequence classifier:

* the labels are read from the training data (:class:`~peftspec.data.examples.Labels`:
  string labels in sorted order, integer labels as their own ids); an eval
  file's labels must be among them;
* the model is the source's classification variant with ``num_labels`` classes
  (the default model with a ``score`` head, ``AutoModelForSequenceClassification``
  for ``hf:``), its new head drawn from torch's generator seeded with ``--seed``;
* the new head must be trained: a spec that leaves it frozen is refused, with
  the ``[[train]]`` rule to add (``params = ["score.**"]``), since a random
  head would make every prediction noise. ``[[train]]`` parameters travel in
  the adapter file, so the head does too;
* the loss is the model's cross-entropy over the labels; evaluation reports
  loss and accuracy;
* the adapter file records ``task = "sequence-classification"`` and
  ``labels``, a JSON list whose index is the class id (:func:`adapter_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from peftspec.core.errors import PeftspecError
from peftspec.core.untrusted import BadText, json_loads
from peftspec.data import examples as data
from peftspec.data import reading, stream
from peftspec.data.index import RecordIndex
from peftspec.models import native
from peftspec.formats.adapter_file import read_metadata
from peftspec.train.resume import CheckpointError
from peftspec.core.errors import AdapterFileError

CLASSIFICATION = "sequence-classification"


class TaskError(PeftspecError):
    """The model or spec does not fit the task the data asks for (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class Task:
    """The examples of a run and, for classification, its labels."""

    train: list[data.Example]
    eval: list[data.Example] | None
    labels: data.Labels | None
    source: str
    skipped: int = 0  # malformed records left out (skip_bad_records)
    # a streamed run's records (peftspec.data.stream): ``train`` is then empty
    records: stream.Records | None = None

    @property
    def classify(self) -> bool:
        return self.labels is not None

    def adapter_metadata(self) -> dict[str, str]:
        """What the adapter file records about the task (nothing for a causal LM)."""
        if self.labels is None:
            return {}
        return {"task": CLASSIFICATION, "labels": self.labels.to_json()}


def read(cfg) -> Task:
    """Read and check ``cfg.data`` (and ``cfg.eval``): records, kinds, labels."""
    if not cfg.data:
        raise data.DataError("no training data: give --data FILE (or 'data' in the spec's "
                             "[train_config])")
    source = _shown_data(cfg.data)
    records, first = _streamed(cfg)
    if records is not None:
        train, labels, skipped = [], None, len(records.bad)
    else:
        read_train = reading.read(cfg.data, skip_bad=cfg.skip_bad_records)
        train, skipped = read_train.examples, read_train.skipped
        first = train[0]
        labels = data.Labels.of(train, source) if first.label is not None else None
    read_eval = reading.read(cfg.eval, skip_bad=cfg.skip_bad_records) if cfg.eval else None
    evals = read_eval.examples if read_eval else None
    if evals is not None:
        if (evals[0].label is not None) != (labels is not None):
            raise data.DataError(
                f"{evals[0].where}: the eval data is {evals[0].kind} records, the training "
                f"data ({source}) {first.kind} records; evaluate on the same kind")
        if labels is not None:
            for ex in evals:
                labels.id(ex.label, ex.where)  # an unseen label is an error here
    return Task(train=train, eval=evals, labels=labels, source=source,
                skipped=skipped + (read_eval.skipped if read_eval else 0), records=records)


def _streamed(cfg) -> tuple[stream.Records | None, data.Example | None]:
    """The indexed records of a streamed run (``streaming``), and the first of
    them; ``(None, None)`` to read the data whole. Classification data is read
    whole: its labels come from every record."""
    paths = stream.wanted(cfg.data, cfg.streaming)
    if paths is None:
        return None, None
    records = stream.Records(RecordIndex.build(paths), skip_bad=cfg.skip_bad_records)
    records.check()  # every record parsed: the bad ones reported before training
    first = records.first
    if first.label is None:
        return records, first
    if cfg.streaming == "on":
        raise data.DataError(f"{first.where}: a classification record; streaming is for "
                             "language modelling (a classifier's labels are read from every "
                             "record first): train with streaming = \"off\"")
    records.index.close()
    return None, None


def _shown_data(value) -> str:
    """``--data`` as a user wrote it: one path, or several joined by commas."""
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def load_model(task: Task, source: str | None, registry, seed: int, *, spec=None,
               world_size: int = 1):
    """The model ``source`` names, in its classification variant for a
    classification task (the new head seeded with ``seed``).

    Given the ``spec``, a causal LM from a ``smollm2`` or ``gguf:`` cache folder is
    built without transformers where that covers the run
    (:mod:`peftspec.models.native`)."""
    if spec is not None:

        if native.why_not(source, spec, world_size, task.classify) is None:
            model = native.load_for_training(source)
            if model is not None:
                return model
    if not task.classify:
        return registry.load_model(source)
    torch.manual_seed(seed)
    return registry.load_model(source, num_labels=len(task.labels))


def num_labels_of(model) -> int | None:
    """A sequence classifier's class count (its ``num_labels``), else None."""
    n = getattr(model, "num_labels", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def check_model(task: Task, model) -> None:
    """A given model must fit the task: a classifier of as many classes as labels."""
    n = num_labels_of(model)
    name = type(model).__name__
    if task.classify and n is None:
        raise TaskError(f"{task.source} holds classification records {{\"text\", \"label\"}}, "
                        f"but the model ({name}) is not a sequence classifier (no num_labels); "
                        f"build it with num_labels={len(task.labels)}, e.g. "
                        f"peftspec.load_model(source, num_labels={len(task.labels)})")
    if task.classify and n != len(task.labels):
        raise TaskError(f"the model ({name}) has {n} classes; {task.source} has "
                        f"{len(task.labels)} ({_shown(task.labels)})")
    if not task.classify and n is not None:
        raise TaskError(f"the model ({name}) is a sequence classifier, but {task.source} "
                        "holds language modelling records; classification data is "
                        "{\"text\", \"label\"} records")


def check_head_trained(task: Task, model) -> None:
    """Refuse to train a classifier whose new (random) head the spec leaves frozen."""
    if not task.classify:
        return
    params = dict(model.named_parameters())
    new = [n for n in getattr(model, "peftspec_new_parameters", ()) or () if n in params]
    frozen = [n for n in new if not params[n].requires_grad]
    if not frozen:
        return
    modules = sorted({n.rpartition(".")[0] or n for n in frozen})
    rule = ", ".join(f'"{m}.**"' for m in modules)
    raise TaskError(
        f"the classification head is new (randomly initialised) but the spec leaves it "
        f"frozen: {', '.join(frozen)}. Its predictions would be noise; train it by adding "
        f"to the spec:\n\n[[train]]\nparams = [{rule}]")


def check_resume(task: Task, adapter_path: Path) -> None:
    """A resumed run must have the labels (and task) of its checkpoint."""

    meta = read_metadata(adapter_path)
    saved = _labels_in(meta, adapter_path)
    ours = list(task.labels.names) if task.labels is not None else None
    if saved == ours:
        return

    def show(labels):
        return "language modelling" if labels is None else \
            f"classification with labels {labels}"

    raise CheckpointError(f"{adapter_path.parent}: the checkpoint was trained for "
                          f"{show(saved)}; {task.source} is {show(ours)}")


def adapter_labels(path: str | Path) -> list[str | int] | None:
    """The labels a classifier adapter file was trained on (index = class id),
    or None for an adapter that is not a classifier's.

    To predict with one::

        labels = adapter_labels("clf.safetensors")
        model = peftspec.load_model(num_labels=len(labels))  # or "hf:DIR"
        peftspec.load_adapter(model, "clf.safetensors")
        label = labels[int(model(**batch).logits.argmax(-1)[0])]
    """

    return _labels_in(read_metadata(path), Path(path))


def _labels_in(meta: dict, path: Path) -> list | None:
    if meta.get("task") != CLASSIFICATION:
        return None
    try:
        labels = json_loads(meta["labels"])
    except (KeyError, BadText):
        labels = None
    if not isinstance(labels, list):

        raise AdapterFileError(f"{path}: a classifier's adapter whose 'labels' metadata is "
                               "missing or not a JSON list")
    return labels


def _shown(labels: data.Labels) -> str:
    names = list(labels.names)
    return ", ".join(map(repr, names[:10])) + (", ..." if len(names) > 10 else "")


def _logits(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[1] if len(output) > 1 else output[0]
    if logits is None or logits.dim() != 2:
        raise TaskError("the classifier returned no (batch, num_labels) logits")
    return logits


@torch.no_grad()
def evaluate(model, items: list, *, batch_size: int, pad_id: int, device, autocast,
             world) -> dict:
    """Mean cross-entropy and accuracy of ``model`` over ``items`` ((ids, class) pairs),
    summed over the processes of ``world``."""
    loss, correct, count = 0.0, 0, 0
    for batch in data.eval_batches(items, batch_size, pad_id):
        # this process's rows (every process runs the forward, FSDP needs it; a
        # stand-in row, n == 0, counts for nothing)
        batch, n, _ = world.shard(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = _logits(model(**batch)).float()
        if n == 0:
            continue
        labels = batch["labels"]
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += n
    loss, correct, count = world.sum(loss), int(world.sum(correct)), int(world.sum(count))
    return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1),
            "examples": count}


__all__ = ["CLASSIFICATION", "Task", "TaskError", "adapter_labels", "check_head_trained",
           "check_model", "check_resume", "evaluate", "load_model", "num_labels_of", "read"]
