"""The training loop: AdamW on the trainable parameters only.

Everything the ``peftspec train`` command does goes through :func:`train`;
the command adds a progress bar, signal handling and printing. The loop:

1. reads the data, which decides the task (causal LM, or sequence
   classification: :mod:`peftspec.train.tasks`), loads the model and its
   tokenizer, encodes the data;
2. seeds torch and ``random`` with ``seed``, then applies the spec (so the
   adapter's init matches ``peftspec apply --seed``), or, resuming, loads the
   checkpoint's adapter, optimizer state, RNG states and data position;
3. per optimizer step: ``grad_accum`` micro-batches (each loss divided by
   ``grad_accum``), gradient-norm clipping, the scheduled learning rate, an
   AdamW step. The frozen base never reaches the optimizer and its tensors are
   never written;
4. evaluates every ``eval_every`` steps and at the end, checkpoints every
   ``save_every`` steps and when ``should_stop()`` turns true (Ctrl-C), and
   writes the adapter.

Only the main process (``rank0``) writes files or calls ``on_event``. Under
``torchrun`` the same loop trains data-parallel (DDP, or FSDP2 with ``fsdp``),
with the results of one process: :mod:`peftspec.train.distributed`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from peftspec.core.atomicio import check_room
from peftspec.core.train_config import TrainConfig
from peftspec.formats.adapter_file import file_tensors
from peftspec.train import allocator, distributed, metrics
from peftspec.train.memory import peak_rss_mb
from peftspec.train.metrics import MetricsLog
from peftspec.train.run import Run

__all__ = ["Run", "TrainResult", "peak_rss_mb", "train"]


@dataclass
class TrainResult:
    """What a run did. ``interrupted``: stopped early, with a checkpoint at ``checkpoint``."""

    step: int
    total_steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens: int
    seconds: float
    peak_rss_mb: float
    interrupted: bool = False
    checkpoint: Path | None = None
    out: Path | None = None
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _streamed(run: Run) -> dict | None:
    """What the start event says of a streamed run's data."""
    if run.task.records is None:
        return None
    index = run.task.records.index
    return {"records": len(index), "files": len(index.files), "bytes": index.nbytes,
            "index_bytes": index.memory, "index_seconds": index.seconds,
            "check_seconds": run.task.records.checked_seconds}


def train(spec, cfg: TrainConfig, *, model_source: str | None = None, model=None,
          out: str | Path | None = None, resume: str | Path | None = None, registry=None,
          on_event: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] = lambda: False,
          max_steps_this_run: int | None = None, rank0: bool | None = None,
          fsdp: bool = False, force: bool = False) -> TrainResult:
    """Train ``spec``'s adapter on ``model`` (or the model ``model_source`` names).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this trains data-parallel, starting
    and ending the process group unless the caller started one: see
    :mod:`peftspec.train.distributed`. ``cfg.batch_size`` is the global batch.

    Args:
        spec: a :class:`peftspec.Spec` (its ``[train_config]`` is not read here:
            resolve ``cfg`` with :meth:`TrainConfig.resolve`).
        out: where to write the trained adapter (rank 0 only).
        resume: a checkpoint folder, or a checkpoint directory with ``latest``.
        on_event: called with each metrics record, and ``{"type": "start", ...}``
            first (rank 0 only).
        should_stop: polled before each step; when true, a checkpoint is written
            and the run returns with ``interrupted=True``.
        max_steps_this_run: stop (as if interrupted) after this many steps.
        rank0: whether this process writes files and reports (default: rank 0).
        fsdp: shard the model with FSDP2 instead of replicating it with DDP
            (under torchrun only).
        force: train an adapter larger than the base or than the memory
            available (its weights, gradients and AdamW states), which is
            otherwise refused before anything is allocated.
    """
    with distributed.session(fsdp) as world:
        return _train(spec, cfg, model_source=model_source, model=model, out=out,
                      resume=resume, registry=registry, on_event=on_event,
                      should_stop=should_stop, max_steps_this_run=max_steps_this_run,
                      rank0=world.rank0 if rank0 is None else rank0, world=world,
                      force=force)


def _train(spec, cfg: TrainConfig, *, model_source, model, out, resume, registry, on_event,
           should_stop, max_steps_this_run, rank0: bool,
           world: distributed.World, force: bool = False) -> TrainResult:
    emit = on_event if (on_event and rank0) else (lambda record: None)
    if rank0:
        metrics.check_path(cfg.log)  # a bad --log is refused before the model loads
    if spec.rules_of("freeze"):  # a quantized base: keep glibc from fragmenting the heap

        allocator.fix_mmap_threshold()
    run = Run(spec, cfg, model=model, model_source=model_source, registry=registry,
              resume=Path(resume) if resume else None, rank0=rank0, world=world, force=force)
    if out is not None and rank0:  # a full disk or read-only --out: say so before training

        tensors = file_tensors(run.model).values()
        check_room(out, sum(t.numel() * t.element_size() for t in tensors))
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    log = MetricsLog(cfg.log if rank0 else None,
                     resume_step=run.step if run.resume_folder else None)
    emit({"type": "start", "step": run.step, "total_steps": run.total_steps,
          "examples": run.examples, "eval_examples": len(run.eval_items),
          "dropped": run.dropped, "max_length": run.max_length,
          "truncated": run.counts.truncated, "scored_tokens": run.counts.scored_tokens,
          "skipped_bad": run.task.skipped,
          "packed_rows": len(run.rows) if run.rows is not None else None,
          "streamed": _streamed(run), "packing": run.cfg.packing,
          "trainable": sum(p.numel() for p in run.params),
          "checkpointing": run.checkpointing, "resumed_from": run.resume_folder,
          "precision": run.cfg.precision, "precision_why": run.precision_why,
          "threads": run.threads,
          "labels": list(run.task.labels.names) if run.task.classify else None})
    t0, start_step, start_tokens = time.perf_counter(), run.step, run.tokens
    losses, eval_loss, interrupted, saved = [], None, False, None
    try:
        while run.step < run.total_steps:
            ran = run.step - start_step
            # every process stops at the same step when one of them is told to
            if world.any(should_stop()) or \
                    (max_steps_this_run is not None and ran >= max_steps_this_run):
                interrupted = True
                break
            record = run.train_step()
            record["time"] = time.perf_counter() - t0
            losses.append(record["loss"])
            log.write(record)
            emit(record)
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total_steps:
                ev = run.evaluate()
                if ev:
                    eval_loss = ev["loss"]
                    log.write(ev)
                    emit(ev)
            if cfg.save_every and ckpt_dir and run.step % cfg.save_every == 0:
                saved = run.save_checkpoint(ckpt_dir)
                emit({"type": "checkpoint", "step": run.step, "path": saved})
        if interrupted:
            if ckpt_dir and (saved is None or not saved.name.endswith(f"{run.step:08d}")):
                saved = run.save_checkpoint(ckpt_dir)
        else:
            ev = run.evaluate()
            if ev:
                eval_loss = ev["loss"]
                log.write(ev)
                emit(ev)
            if out is not None:
                run.save_adapter(out)  # rank 0 writes; under FSDP all gather first
        if run.task.records is not None:  # what the stream read, counted as it went
            c = run.batches.counts
            emit({"type": "data", "records": c.records, "truncated": c.truncated,
                  "dropped": c.dropped, "skipped_bad": c.skipped_bad,
                  "scored_tokens": c.scored_tokens})
    finally:
        run.close()
        log.close()
    return TrainResult(step=run.step, total_steps=run.total_steps,
                       train_loss=losses[-1] if losses else None, eval_loss=eval_loss,
                       tokens=run.tokens - start_tokens, seconds=time.perf_counter() - t0,
                       peak_rss_mb=peak_rss_mb(), interrupted=interrupted,
                       checkpoint=saved, out=Path(out) if out and not interrupted else None,
                       losses=losses)
