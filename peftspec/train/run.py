"""One training run's state and its optimizer step: :class:`Run`.

:func:`peftspec.train.loop.train` builds a :class:`Run` and drives it. A
``Run`` reads and encodes the data (which decides the task), applies the spec
or restores a checkpoint, builds the optimizer, and on request does one
optimizer step (:meth:`Run.train_step`), one evaluation
(:meth:`Run.evaluate`), or writes a checkpoint or the adapter.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch

from peftspec.core.errors import PeftspecError
from peftspec.core.facade import apply, trainable_parameters
from peftspec.core.modelinfo import context_length
from peftspec.core import threads
from peftspec.train import precision
from peftspec.core.registry import registry_or_default
from peftspec.core.train_config import OPTIONS, TrainConfig
from peftspec.data import examples as data
from peftspec.data import packing, stream
from peftspec.data.encoding import Counts, encode_lm
from peftspec.formats.adapter_file import file_tensors, load_adapter, save_adapter
from peftspec.models.tokenizer import tokenizer_for
from peftspec.train import distributed, hooks, optim, tasks
from peftspec.train.scored import ScoredLoss, loss_of
from peftspec.train import grad_checkpoint as checkpointing
from peftspec.train import resume as ckpt
from peftspec.train.hooks import init_from_data
from peftspec.train.schedule import lr_at


class Run:
    """One training run's state; :func:`train` drives it."""

    def __init__(self, spec, cfg: TrainConfig, *, model=None, model_source=None, registry=None,
                 resume: Path | None = None, rank0: bool = True,
                 world: distributed.World | None = None, force: bool = False):
        self.cfg, self.rank0 = cfg, rank0
        self.threads = threads.use(cfg.threads or None)  # peftspec.core.threads
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
        chosen, self.precision_why = precision.for_run(cfg.precision, self.resume_folder,
                                                       self.model)
        self.cfg = cfg = cfg.with_(precision=chosen)
        if cfg.packing:
            self._check_packing(spec)
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
        self.batches = self._batches()
        self.total_steps = cfg.steps or \
            cfg.epochs * -(-self.batches.per_epoch // cfg.grad_accum)
        self.step, self.tokens = 0, 0
        # what the methods do beyond their forward (AdaLoRA): peftspec.train.hooks
        self.hooks = hooks.training_hooks(self.model, self.total_steps)
        if self.resume_folder is not None:
            self._restore()
            for h in self.hooks:
                h.resume(self.step)
        self.world.seed_dropout(cfg.seed, self.step)

    def _batches(self):
        """The training batches: from the encoded items, packed or not, or
        streamed from the indexed records (peftspec.data.stream)."""
        cfg, pad = self.cfg, self.tok.pad_id
        self.rows = None
        if self.task.records is not None:
            encode = stream.encoder(self.tok, self.max_length, loss_on=cfg.loss_on,
                                    truncation=cfg.truncation)
            return stream.StreamBatches(
                self.task.records, self.stream_numbers, encode, batch_size=cfg.batch_size,
                pad_id=pad, seed=cfg.seed, packing=cfg.packing, max_length=self.max_length,
                collate=packing.collate_packed if cfg.packing else data.collate)
        if cfg.packing:  # rows of whole examples, made once from the seed: peftspec.data.packing
            self.rows = packing.pack(self.train_items, self.max_length, cfg.seed)
            return data.Batches(self.rows, cfg.batch_size, pad, cfg.seed,
                                collate=packing.collate_packed)
        return data.Batches(self.train_items, cfg.batch_size, pad, cfg.seed)

    def close(self) -> None:
        """Stop what runs beside the steps (a streamed run's data worker)."""
        close = getattr(self, "batches", None) and getattr(self.batches, "close", None)
        if close:
            close()

    @property
    def examples(self) -> int:
        """The training examples (a streamed run: the records that train)."""
        if self.task.records is not None:
            return self.batches.n
        return len(self.train_items)

    def _check_packing(self, spec) -> None:
        """Packing needs a causal LM that keeps packed examples apart, and no
        soft prompt (its virtual tokens would lead a row, not each example)."""
        if self.task.classify:
            raise PeftspecError("packing is for causal language modelling; a classifier's "
                                "examples are one label each (train without packing)")
        if spec.rules_of("prefix"):
            raise PeftspecError("packing cannot go with a soft prompt ([prefix] rules): its "
                                "virtual tokens would lead each row, not each example; "
                                "train without packing")
        try:
            packing.verify(self.model, getattr(self.tok, "vocab_size", None))
        except packing.PackingError as exc:
            raise PeftspecError(str(exc)) from None

    def _init_from_data(self) -> None:
        """Data-driven initialisation (LoRA's EVA) from the training items, in
        file order, before the optimizer sees the parameters."""

        device = next(self.model.parameters()).device
        report = (lambda m: print(m, file=sys.stderr, flush=True)) if self.rank0 else None
        def items():  # a streamed run: the first window of its order
            if self.task.records is None:
                return self.train_items
            return self._stream_sample()

        init_from_data(self.model, hooks.Reiterable(lambda: (
            {k: v.to(device) for k, v in b.items()}
            for b in data.eval_batches(items(), self.cfg.batch_size,
                                       self.tok.pad_id))), report)

    def _stream_sample(self) -> list:
        cfg = self.cfg
        batches = stream.StreamBatches(
            self.task.records, self.stream_numbers,
            stream.encoder(self.tok, self.max_length, loss_on=cfg.loss_on,
                           truncation=cfg.truncation),
            batch_size=cfg.batch_size, pad_id=self.tok.pad_id, seed=cfg.seed, collate=data.collate)
        return batches.sample(stream.WINDOW)

    def _read_data(self) -> None:
        cfg = self.cfg
        if not cfg.data:
            raise data.DataError("no training data: give --data FILE (or 'data' in the spec's "
                                 "[train_config])")
        limit = context_length(self.model)
        self.max_length = min(cfg.max_length, limit) if limit else cfg.max_length
        if cfg.chat_template:
            self.tok.use_chat_template(data.read_text(Path(cfg.chat_template), "chat template"))
        self.counts = Counts()
        self.stream_numbers = None
        if self.task.records is not None:
            self._read_stream()
            return
        items = self._encode(self.task.train)
        if not items:
            raise data.DataError(f"{self.task.source}: no example has a token to learn from" +
                                 _why_none(self.counts, cfg))
        if cfg.eval:
            self.train_items, self.eval_items = items, self._encode(self.task.eval)
        else:
            self.train_items, self.eval_items = data.split(items, cfg.eval_split, cfg.seed)
        self.dropped = self.counts.dropped
        self.data_digest = data.file_digest(cfg.data)

    def _read_stream(self) -> None:
        """A streamed run reads its training records as it goes: here only the
        eval set is encoded (an eval file, or the records an eval split holds
        out, chosen as :func:`peftspec.data.examples.split` chooses)."""
        cfg, records = self.cfg, self.task.records
        self.train_items = None
        n = len(records.index)
        if cfg.eval:
            self.eval_items = self._encode(self.task.eval)
        elif cfg.eval_split > 0:
            self.stream_numbers, held = stream.split_numbers(n, cfg.eval_split, cfg.seed)
            encode = stream.encoder(self.tok, self.max_length, loss_on=cfg.loss_on,
                                    truncation=cfg.truncation)
            self.eval_items = []
            for number in held:
                ex = records.example(number, self.counts)
                item = encode(ex, self.counts) if ex is not None else None
                if item is not None:
                    self.eval_items.append(item)
        else:
            self.eval_items = []
        self.dropped = self.counts.dropped
        self.data_digest = records.index.digest

    def _encode(self, examples) -> list:
        cfg = self.cfg
        if self.task.classify:
            items, dropped = data.encode_all(examples, self.tok, self.max_length,
                                             self.task.labels)
            self.counts.add(Counts(records=len(examples), dropped=dropped,
                                   dropped_empty=dropped))
            return items
        items, counts = encode_lm(examples, self.tok, self.max_length, loss_on=cfg.loss_on,
                                  truncation=cfg.truncation)
        self.counts.add(counts)
        return items

    def _build_optimizer(self) -> None:

        params = trainable_parameters(self.model)
        if not params:
            raise PeftspecError("the spec leaves nothing trainable")
        self.names = {id(p): n for n, p in params.items()}
        # weight decay on 2-D+ tensors; LoRA+'s learning rates (peftspec.train.optim)
        self.optimizer = torch.optim.AdamW(optim.param_groups(self.model, params, self.cfg),
                                           lr=self.cfg.lr)
        self.params = list(params.values())
        # the head and cross-entropy at scored positions only (peftspec.train.scored)
        self.scored = ScoredLoss(self.model, self.params) \
            if self.cfg.fused_loss and not self.task.classify and not self.world.fsdp else None

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
        total, tokens, scored_total, positions, extra_total = 0.0, 0, 0, 0, 0.0
        world = self.world
        for i in range(self.cfg.grad_accum):
            full = self.batches.next()
            tokens += full.tokens  # padding excluded (a packed batch's mask is 4-D)
            scored_total += data.scored(full["labels"])
            positions += full["input_ids"].numel()  # padding included
            # this process's rows of the global batch, and its share of the batch's
            # scored tokens (1.0 on one process; see peftspec.train.distributed)
            part, n, _ = world.shard(full)
            batch = {k: v.to(device) for k, v in part.items()}
            with world.no_sync(self.forward, last=i == self.cfg.grad_accum - 1):
                with self._autocast():
                    output = self.scored.loss(self.forward, batch) if self.scored else \
                        self.forward(**batch)
                    loss = loss_of(output)
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
        epoch = self.batches.epoch_progress
        record = {"type": "train", "step": self.step, "epoch": round(epoch, 4), "loss": loss,
                  "lr": lr, "grad_norm": norm, "tokens": self.tokens,
                  "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                  "step_tokens": tokens, "scored_tokens": scored_total, "positions": positions,
                  "seconds": dt}
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
                    output = self.scored.loss(self.model, part) \
                        if self.scored and self.scored.checked else self.model(**part)
                    # the batch's mean loss is the processes' shares of it, summed
                    share = self.world.share(part, batch, output, n_part)
                    total += float(loss_of(output)) * share * n
                count += n
        finally:
            self.model.train()
        total = self.world.sum(total)
        return {"type": "eval", "step": self.step, "loss": total / max(count, 1),
                "tokens": count}


def _why_none(counts: Counts, cfg) -> str:
    """Why encoding kept nothing, for the error."""
    if counts.dropped and counts.dropped == counts.dropped_empty:
        return (f" ({counts.dropped} record(s) with no scored token within max_length "
                f"{cfg.max_length}: raise max_length, or check loss_on = {cfg.loss_on!r})")
    if counts.dropped:
        return (f" ({counts.dropped} record(s) dropped: longer than max_length "
                f"{cfg.max_length} under truncation = {cfg.truncation!r})")
    return ""
