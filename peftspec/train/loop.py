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

import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from peftspec.core.errors import PeftspecError
from peftspec.core.facade import apply
from peftspec.core.modelinfo import context_length
from peftspec.core.registry import registry_or_default
from peftspec.formats.adapter_file import load_adapter
from peftspec.train import resume as ckpt
from peftspec.data import examples as data
from peftspec.train import distributed, hooks, metrics, optim, tasks
from peftspec.train import grad_checkpoint as checkpointing
from peftspec.core.train_config import OPTIONS, TrainConfig
from peftspec.train.metrics import MetricsLog
from peftspec.train.schedule import lr_at
from peftspec.models.tokenizer import tokenizer_for
from peftspec.train.hooks import init_from_data
from peftspec.core.facade import trainable_parameters
from peftspec.formats.adapter_file import file_tensors
from peftspec.formats.adapter_file import save_adapter
from peftspec.train import allocator
from peftspec.core.atomicio import check_room


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


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's ``VmHWM`` (from ``/proc/self/status``), which starts afresh at
    exec; ``ru_maxrss`` instead carries a parent's peak over fork and exec, so a
    run launched from a notebook that once held 2 GB would report 2 GB. Where
    there is no ``/proc``, ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _loss_of(output) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None:
        raise PeftspecError("the model returned no loss for input_ids + labels; train needs "
                            "a causal LM that computes its loss from labels")
    return loss


class Run:
    """One training run's state; :func:`train` drives it."""

    def __init__(self, spec, cfg: TrainConfig, *, model=None, model_source=None, registry=None,
                 resume: Path | None = None, rank0: bool = True,
                 world: distributed.World | None = None, force: bool = False):
        self.cfg, self.rank0 = cfg, rank0
        self.world = world or distributed.World()
        self.world.check_batch_size(cfg.batch_size)
        self.registry = registry_or_default(registry)
        self.task = tasks.read(cfg)  # causal LM or classification, from the data
        self.model = model if model is not None else \
            tasks.load_model(self.task, model_source, self.registry, cfg.seed, spec=spec,
                             world_size=self.world.size)
        tasks.check_model(self.task, self.model)
        self.tok = tokenizer_for(model_source, self.model)
        self._read_data()
        self.resume_folder = ckpt.find(resume) if resume else None
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if self.resume_folder is None:
            apply(spec, self.model, registry=self.registry, force=force, training=True)
            self._init_from_data()
        else:
            tasks.check_resume(self.task, self.resume_folder / "adapter.safetensors")
            load_adapter(self.model, self.resume_folder / "adapter.safetensors",
                         registry=self.registry, force=force)
        tasks.check_head_trained(self.task, self.model)
        self.model.train()
        self.checkpointing = checkpointing.enable(self.model) \
            if cfg.gradient_checkpointing else None
        self.forward = self.world.prepare(self.model)  # DDP / FSDP under torchrun
        self._build_optimizer()
        self.batches = data.Batches(self.train_items, cfg.batch_size, self.tok.pad_id, cfg.seed)
        per_step = -(-self.batches.per_epoch // cfg.grad_accum)
        self.total_steps = cfg.steps or cfg.epochs * per_step
        self.step, self.tokens = 0, 0
        # what the methods do beyond their forward (AdaLoRA): peftspec.train.hooks
        self.hooks = hooks.training_hooks(self.model, self.total_steps)
        if self.resume_folder is not None:
            self._restore()
            for h in self.hooks:
                h.resume(self.step)
        self.world.seed_dropout(cfg.seed, self.step)

    def _init_from_data(self) -> None:
        """Data-driven initialisation (LoRA's EVA) from the training items, in
        file order, before the optimizer sees the parameters."""

        device = next(self.model.parameters()).device
        report = (lambda m: print(m, file=sys.stderr, flush=True)) if self.rank0 else None
        init_from_data(self.model, hooks.Reiterable(lambda: (
            {k: v.to(device) for k, v in b.items()}
            for b in data.eval_batches(self.train_items, self.cfg.batch_size,
                                       self.tok.pad_id))), report)

    def _read_data(self) -> None:
        cfg = self.cfg
        if not cfg.data:
            raise data.DataError("no training data: give --data FILE (or 'data' in the spec's "
                                 "[train_config])")
        limit = context_length(self.model)
        self.max_length = min(cfg.max_length, limit) if limit else cfg.max_length
        items, self.dropped = data.encode_all(self.task.train, self.tok, self.max_length,
                                              self.task.labels)
        if not items:
            raise data.DataError(f"{cfg.data}: no example has a token to learn from")
        if cfg.eval:
            evals, dropped = data.encode_all(self.task.eval, self.tok, self.max_length,
                                             self.task.labels)
            self.dropped += dropped
            self.train_items, self.eval_items = items, evals
        else:
            self.train_items, self.eval_items = data.split(items, cfg.eval_split, cfg.seed)
        self.data_digest = data.file_digest(cfg.data)

    def _build_optimizer(self) -> None:

        params = trainable_parameters(self.model)
        if not params:
            raise PeftspecError("the spec leaves nothing trainable")
        self.names = {id(p): n for n, p in params.items()}
        # weight decay on 2-D+ tensors; LoRA+'s learning rates (peftspec.train.optim)
        self.optimizer = torch.optim.AdamW(optim.param_groups(self.model, params, self.cfg),
                                           lr=self.cfg.lr)
        self.params = list(params.values())

    def schedule(self) -> dict:
        c = self.cfg
        return {"kind": "warmup-cosine", "lr": c.lr, "warmup": c.warmup,
                "total": self.total_steps, "min_lr_ratio": c.min_lr_ratio}

    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, lr=c.lr, warmup=c.warmup, total=self.total_steps,
                     min_lr_ratio=c.min_lr_ratio)

    def _restore(self) -> None:
        folder = self.resume_folder
        state = ckpt.read_state(folder)
        saved = state.get("config", {})
        changed = [k for k in TrainConfig.TRAJECTORY
                   if saved.get(k, OPTIONS[k].default) != getattr(self.cfg, k)]
        if changed:
            raise ckpt.CheckpointError(
                f"{folder}: resuming with other settings than the checkpoint's: " +
                ", ".join(f"{k} {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in changed))
        if state.get("data_digest") != self.data_digest:
            raise ckpt.CheckpointError(f"{folder}: the data file {self.cfg.data} differs from "
                                       "the one the checkpoint was trained on")
        if state.get("schedule", {}).get("total") != self.total_steps:
            raise ckpt.CheckpointError(
                f"{folder}: the run had {state['schedule']['total']} steps in all, this one "
                f"{self.total_steps}; keep --steps/--epochs (the schedule depends on them)")
        ckpt.load_optimizer(self.optimizer, self.names, folder / "optimizer.safetensors")
        self.world.reshard_optimizer_state(self.optimizer)
        self.batches.seek(state["data_position"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        ckpt.set_rng_state(state["rng"])

    def save_checkpoint(self, directory: Path) -> Path:
        """Write a checkpoint (rank 0; every rank calls: FSDP gathers shards first)."""

        sharded = self.world.fsdp and self.world.distributed
        adapter = self.world.gather(file_tensors(self.model)) if sharded else None
        optim = ckpt.optimizer_tensors(self.optimizer, self.names) if sharded else None
        if optim is not None:
            optim = (self.world.gather(optim[0]), optim[1])
        final = directory / f"step-{self.step:08d}"
        if self.rank0:
            state = {"tokens": self.tokens, "data_position": self.batches.position(),
                     "schedule": self.schedule(), "data_digest": self.data_digest,
                     "config": {k: getattr(self.cfg, k) for k in TrainConfig.TRAJECTORY}}
            final = ckpt.save(directory, step=self.step, model=self.model,
                              optimizer=self.optimizer, names=self.names, state=state,
                              adapter_tensors=adapter, optimizer_state=optim,
                              adapter_metadata=self.task.adapter_metadata())
        self.world.barrier()
        return final

    def save_adapter(self, out: str | Path) -> None:
        """Write the adapter to ``out`` (rank 0; every rank calls)."""

        sharded = self.world.fsdp and self.world.distributed
        tensors = self.world.gather(file_tensors(self.model)) if sharded else None
        if self.rank0:
            save_adapter(self.model, out, tensors=tensors,
                         metadata=self.task.adapter_metadata())
        self.world.barrier()

    def _autocast(self):
        device = self.params[0].device.type
        return torch.autocast(device, dtype=torch.bfloat16,
                              enabled=self.cfg.precision == "bf16")

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics record."""
        t0 = time.perf_counter()
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        device = self.params[0].device
        total, tokens, extra_total = 0.0, 0, 0.0
        world = self.world
        for i in range(self.cfg.grad_accum):
            full = self.batches.next()
            tokens += int(full["attention_mask"].sum())
            # this process's rows of the global batch, and its share of the batch's
            # scored tokens (1.0 on one process; see peftspec.train.distributed)
            part, n, _ = world.shard(full)
            batch = {k: v.to(device) for k, v in part.items()}
            with world.no_sync(self.forward, last=i == self.cfg.grad_accum - 1):
                with self._autocast():
                    output = self.forward(**batch)
                    loss = _loss_of(output)
                    extra = hooks.extra_loss(self.hooks)
                share = world.share(batch, full, output, n)
                objective = loss * (share * world.size)
                if extra is not None:  # the same on every process: added once per batch
                    objective = objective + extra
                    extra_total += float(extra.detach())
                (objective / self.cfg.grad_accum).backward()
            total += float(loss.detach()) * share
        norm = world.grad_norm(self.params, self.cfg.clip)
        self.optimizer.step()
        for h in self.hooks:  # gradients are still there (AdaLoRA's importance)
            h.after_step(self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        loss = world.sum(total) / self.cfg.grad_accum
        if not math.isfinite(loss):
            raise PeftspecError(f"the loss is {loss} at step {self.step}; lower --lr or "
                                "raise --clip")
        dt = time.perf_counter() - t0
        epoch = self.batches.epoch + self.batches.index / self.batches.per_epoch
        record = {"type": "train", "step": self.step, "epoch": round(epoch, 4), "loss": loss,
                  "lr": lr, "grad_norm": norm, "tokens": self.tokens,
                  "tokens_per_s": tokens / dt if dt > 0 else 0.0}
        if extra_total:
            record["extra_loss"] = extra_total / self.cfg.grad_accum
        return record

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if not self.eval_items:
            return None
        self.model.eval()
        total, count = 0.0, 0
        try:
            if self.task.classify:  # loss and accuracy: peftspec.train.tasks
                return {"type": "eval", "step": self.step, **tasks.evaluate(
                    self.model, self.eval_items, batch_size=self.cfg.batch_size,
                    pad_id=self.tok.pad_id, device=self.params[0].device,
                    autocast=self._autocast, world=self.world)}
            for batch in data.eval_batches(self.eval_items, self.cfg.batch_size,
                                           self.tok.pad_id):
                part, n_part, n = self.world.shard(batch)  # this process's rows
                part = {k: v.to(self.params[0].device) for k, v in part.items()}
                with self._autocast():
                    output = self.model(**part)
                    # the batch's mean loss is the processes' shares of it, summed
                    share = self.world.share(part, batch, output, n_part)
                    total += float(_loss_of(output)) * share * n
                count += n
        finally:
            self.model.train()
        total = self.world.sum(total)
        return {"type": "eval", "step": self.step, "loss": total / max(count, 1),
                "tokens": count}


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
          "examples": len(run.train_items), "eval_examples": len(run.eval_items),
          "dropped": run.dropped, "max_length": run.max_length,
          "trainable": sum(p.numel() for p in run.params),
          "checkpointing": run.checkpointing, "resumed_from": run.resume_folder,
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
    finally:
        log.close()
    return TrainResult(step=run.step, total_steps=run.total_steps,
                       train_loss=losses[-1] if losses else None, eval_loss=eval_loss,
                       tokens=run.tokens - start_tokens, seconds=time.perf_counter() - t0,
                       peak_rss_mb=peak_rss_mb(), interrupted=interrupted,
                       checkpoint=saved, out=Path(out) if out and not interrupted else None,
                       losses=losses)
