"""Data-parallel training under ``torchrun``: DDP, or FSDP2 with ``--fsdp``.

``peftspec train`` launched as ``torchrun --nproc_per_node=N peftspec train
...`` (``WORLD_SIZE`` > 1 in the environment) starts the process group itself,
NCCL with each process on ``cuda:LOCAL_RANK`` when CUDA is available, gloo on
the CPU otherwise, and ends it when training ends. A caller that started a
process group already keeps it.

What N processes compute is what one process computes:

* ``--batch-size`` is the *global* batch. Every process draws the same seeded
  global batch (:class:`peftspec.data.examples.Batches`) and keeps its slice of
  contiguous rows (padding trimmed), so the data order, the schedule and a
  checkpoint's data position do not depend on N.
* One process's loss for a micro-batch is the mean over its scored tokens.
  Slices hold different numbers of scored tokens, so a slice's own mean loss
  is weighted by its share of the global batch's scored tokens, and by N to
  undo the mean over processes that DDP's all-reduce and FSDP's
  reduce-scatter take: the synchronized gradient is the one-process gradient.
  A slice left empty (a last, short batch) runs one row with weight 0, since
  every process must take part in each backward.
* The reported loss, eval loss and token counts are global (summed over
  processes).

DDP (the default) keeps a full copy per process: frozen parameters have
``requires_grad=False`` and never enter its gradient buckets; it broadcasts
the parameters from rank 0 once, so every process starts from rank 0's adapter
init; buffers are not re-broadcast per step (they do not train). Gradients of
the non-final micro-steps of ``--grad-accum`` stay local (``no_sync``).

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each transformer block
(the largest ``nn.ModuleList``) and then the root, one DTensor shard per
parameter, so frozen and trainable parameters mix in one block (FSDP1's flat
parameters cannot: "Must flatten tensors with uniform requires_grad").
Saving gathers the adapter's tensors and the optimizer's state (every
process takes part; rank 0 writes); resuming re-shards the optimizer's state.
Each process still loads the whole base into CPU memory before sharding it;
only its shards go to its device.

Only rank 0 writes files or reports progress; a barrier after each save keeps
the others from running ahead of a failed write.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from peftspec.core.errors import PeftspecError
from peftspec.data.examples import scored
from peftspec.train.grad_checkpoint import block_list as largest_module_list
from peftspec.core.packed import packed_parameters



class DistributedError(PeftspecError):
    """A distributed run is set up wrongly (exit code 2)."""

    exit_code = 2


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer "
                               "(set by torchrun; launch with torchrun --nproc_per_node=N)"
                               ) from None


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of a DTensor (a collective: every rank calls)."""
    return t.full_tensor() if _is_dtensor(t) else t


def block_list(model: nn.Module) -> nn.ModuleList | None:

    return largest_module_list(model)


class World:
    """The processes of one run: rank, size, device, and the collectives the loop needs.

    A world of one (the default) makes every method an identity, so a
    single-process run computes exactly what it did before this module.
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None, fsdp: bool = False, owns: bool = False):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device, self.fsdp, self.owns = device, fsdp, owns

    @property
    def rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- setup ---------------------------------------------------------------
    def check_batch_size(self, batch_size: int) -> None:
        if self.size > 1 and batch_size % self.size:
            up = -(-batch_size // self.size) * self.size
            raise DistributedError(
                f"--batch-size {batch_size} is the global batch and must split evenly over "
                f"the {self.size} processes (WORLD_SIZE): give a multiple of {self.size}, "
                f"e.g. --batch-size {up}, or launch another number of processes")

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put ``model`` on this process's device and wrap it for data parallelism.

        Returns the module to call for training: a DDP wrapper, or ``model``
        itself (sharded in place under FSDP, untouched in a world of one).
        """
        if not self.distributed or not any(p.requires_grad for p in model.parameters()):
            return model

        packed = list(packed_parameters(model))
        if self.fsdp and packed:

            raise PeftspecError(
                f"--fsdp with a [[freeze]]-packed base ({len(packed)} weights, e.g. "
                f"{packed[0]}) is not supported: peftspec's packed weights (nf4, int8, bf16) "
                "do not implement FSDP2's all-gather extension, so they cannot be sharded. "
                "Train with DDP (torchrun without --fsdp): a packed base is small enough to "
                "replicate on every rank")
        if self.fsdp:
            return self._shard(model)
        from torch.nn.parallel import DistributedDataParallel

        if packed:  # frozen and quantized identically on every rank: nothing to broadcast
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, packed)

        if self.device is not None:
            model.to(self.device)
        # buffers do not train: no re-broadcast before each forward (the keyword's
        # name changed in torch 2.13)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params \
            else {"broadcast_buffers": False}
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device is not None else None,
            find_unused_parameters=False, **no_buffer_sync)

    def _shard(self, model: nn.Module) -> nn.Module:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # Each process applied the spec with the same seed; make sure anyway, as
        # DDP does, that the adapter starts from rank 0's values (FSDP does not).
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad:
                    continue
                if self.device is None:
                    dist.broadcast(p.detach(), src=0)  # in place
                else:
                    t = p.detach().to(self.device)
                    dist.broadcast(t, src=0)
                    p.copy_(t)
        mesh = init_device_mesh(self.device.type if self.device is not None else "cpu",
                                (self.size,))
        for block in block_list(model) or ():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def seed_dropout(self, seed: int, step: int) -> None:
        """Give ranks other than 0 their own dropout stream (rank 0 keeps the
        one-process run's), so processes do not drop the same units."""
        if self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + step * 7919 + self.rank) % (2 ** 63))

    # -- per step ------------------------------------------------------------
    def shard(self, batch: dict[str, torch.Tensor], count=None):
        """This process's slice of the global ``batch``: contiguous rows, padding trimmed.

        Returns ``(part, n, n_all)``: the slice, what ``count`` (default
        :func:`peftspec.data.examples.scored`) counts in it and in the whole batch. A rank left without
        rows (a short last batch) gets one stand-in row to run with ``n == 0``:
        every process must take part in each forward and backward. In a world
        of one: ``(batch, n_all, n_all)``.
        """
        count = count or (lambda b: scored(b["labels"]))
        n_all = count(batch)
        if self.size == 1:
            return batch, n_all, n_all
        rows = next(iter(batch.values())).shape[0]
        per = -(-rows // self.size)
        start = min(self.rank * per, rows)
        stop = min(start + per, rows)
        if stop == start:
            return _trim({k: v[:1] for k, v in batch.items()}), 0, n_all
        part = _trim({k: v[start:stop] for k, v in batch.items()})
        return part, count(part), n_all

    def share(self, part: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], output,
              n: int) -> float:
        """The weight of ``part``'s mean loss (the model's ``output``) in the global
        ``batch``'s mean loss: its scored tokens over the batch's, counted as the
        model counts them (1.0 in a world of one; 0.0 for a stand-in row, ``n == 0``)."""
        if self.size == 1:
            return 1.0
        if n == 0:
            return 0.0
        labels = part["labels"]
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, dict):
            logits = output.get("logits")
        # positions the model put in front of the input (prompt tuning): their
        # labels are ignored, and each row's first real token becomes scored
        extra = 0
        if logits is not None and labels.dim() == 2 and logits.dim() >= 2:
            extra = max(0, logits.shape[1] - labels.shape[1])
        return scored(labels, extra) / scored(batch["labels"], extra)

    def no_sync(self, module: nn.Module, last: bool):
        """DDP's ``no_sync`` for the micro-steps before the last of a step."""
        if not last and hasattr(module, "no_sync") and self.distributed and not self.fsdp:
            return module.no_sync()
        return nullcontext()

    def sum(self, value: float) -> float:
        """``value`` summed over the processes."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on one (a Ctrl-C seen by one
        process stops all of them at the same step)."""
        if not self.distributed:
            return flag
        return self.sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if self.device is not None and self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")

    def grad_norm(self, params: list[nn.Parameter], clip: float) -> float:
        """Clip the gradients to ``clip`` (0: do not) and return their total norm."""
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        elif any(_is_dtensor(p.grad) for p in params):
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
        return float(full(norm))

    # -- saving --------------------------------------------------------------
    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors for DTensor shards (a collective under FSDP: every rank calls,
        in the same order)."""
        if not self.fsdp:
            return tensors
        return {k: full(v).detach().cpu() for k, v in tensors.items()}

    def reshard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After loading whole tensors into a sharded run's optimizer state, cut each
        process's shard out of them (every process read the same file)."""
        if not self.fsdp:
            return
        from torch.distributed.tensor import distribute_tensor

        for p, st in optimizer.state.items():
            if not _is_dtensor(p):
                continue
            for key, value in list(st.items()):
                if isinstance(value, torch.Tensor) and not _is_dtensor(value) and \
                        tuple(value.shape) == tuple(p.shape):
                    st[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements,
                                                src_data_rank=None)

    # -- teardown ------------------------------------------------------------
    def close(self, barrier: bool = False) -> None:
        """End the process group if this world started it. ``barrier``: first wait
        for every process (the run ended well on this one), so that none tears its
        connections down while another still uses them; after an error there is no
        wait, which could hang on a process that is gone."""
        if self.owns:
            import torch.distributed as dist

            if dist.is_initialized():
                if barrier and dist.get_world_size() > 1:
                    dist.barrier()
                dist.destroy_process_group()
            self.owns = False


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop trailing positions no row of ``batch`` attends to (right padding)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] == 0:
        return batch
    used = mask.any(0).nonzero()
    width = int(used.max()) + 1 if used.numel() else 1
    if width == mask.shape[1]:
        return batch
    return {k: v[:, :width] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v
            for k, v in batch.items()}


def start(fsdp: bool = False) -> World:
    """The world this process runs in, starting the process group under torchrun."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        if fsdp:
            raise DistributedError(
                "--fsdp shards the model across processes, and this is one process: launch "
                "with torchrun, e.g. torchrun --nproc_per_node=2 --no-python -- peftspec train "
                "SPEC --out A.safetensors --fsdp")
        return World()
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise DistributedError("this torch has no torch.distributed; run one process "
                               "(without torchrun)")
    rank, local_rank = _env_int("RANK", -1), _env_int("LOCAL_RANK", 0)
    if rank < 0:
        raise DistributedError("WORLD_SIZE is set but RANK is not: launch with torchrun "
                               "--nproc_per_node=N, which sets both")
    device = None
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                "device(s): use --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device is not None else "gloo"
        try:
            dist.init_process_group(backend, device_id=device) if device is not None \
                else dist.init_process_group(backend)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"cannot start the {backend} process group ({exc}); "
                                   "launch with torchrun --nproc_per_node=N") from None
        owns = True
    if dist.get_world_size() != size:
        raise DistributedError(f"WORLD_SIZE is {size} but the process group has "
                               f"{dist.get_world_size()} processes")
    return World(rank=dist.get_rank(), size=size, local_rank=local_rank, device=device,
                  fsdp=fsdp, owns=owns)


@contextmanager
def session(fsdp: bool = False):
    """:func:`start` a world and close it (ending a process group it started) after:
    behind a barrier when the block ended well, at once on an error."""
    world = start(fsdp)
    try:
        yield world
    except BaseException:
        world.close()
        raise
    world.close(barrier=True)
