"""A causal LM's loss from its head at the scored positions only.

A model's own loss runs the LM head over every position of the batch and
keeps float32 logits of ``batch x length x vocab`` (403 MB for SmolLM2 at
8 x 256, several copies with their gradient), while a chat example scores
only its completion: 40 % of the positions or fewer, none of the padding.
:class:`ScoredLoss` runs the model's body as it is (every patched module,
every method), catches the hidden states that go into the head, keeps the
rows whose next token is scored, and computes the head and the
cross-entropy there, a chunk of rows at a time (:class:`_ChunkedCE`): the
gradient of each chunk is taken as it is computed and the chunk's logits
are freed, so at most one chunk's logits exist at a time (Liger Kernel's
fused linear cross-entropy does the same on a GPU).

It is the same computation: the loss is the mean cross-entropy over the
same shifted targets (``-100`` ignored), each logit is the head's output for
the same row, in the same precision (autocast applies inside), and the
gradients reach every trainable tensor the head uses (LoRA on ``lm_head``, a
tied embedding that trains). ``tests/test_scored_loss.py`` compares loss and
gradients with the model's own loss on SmolLM2, GPT-2 and nanoGPT.

The head is found as the model's ``get_output_embeddings()`` or its
``lm_head``; the first batch checks that the model's own loss agrees (a model
that changes its logits after the head, e.g. softcapping, does not), and a
model that does not is trained on its own loss with a note saying why.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from peftspec.core.errors import PeftspecError
from peftspec.data.examples import IGNORE

def loss_of(output) -> torch.Tensor:
    """The ``loss`` of a model's output (an object or a dict), or a clear error."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None:
        raise PeftspecError("the model returned no loss for input_ids + labels; train needs "
                            "a causal LM that computes its loss from labels")
    return loss


#: the logits of one chunk are at most this many float32 values (64 MiB)
CHUNK_VALUES = 1 << 24


def find_head(model: nn.Module) -> nn.Module | None:
    """The module that turns a causal LM's hidden states into logits, or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get):
        try:
            head = get()
        except (AttributeError, NotImplementedError):
            head = None
    if head is None:
        head = getattr(model, "lm_head", None)
    return head if isinstance(head, nn.Module) else None


@contextmanager
def _tapped(head: nn.Module):
    """While inside, ``head(x)`` records ``x`` and returns it instead of logits;
    yields the record and the head's own forward."""
    own = head.__dict__.get("forward")  # a forward set on the instance (a patch) stays
    forward = own if own is not None else type(head).forward.__get__(head)
    seen: dict[str, torch.Tensor] = {}

    def tap(x, *args, **kwargs):
        if args or kwargs:
            raise _NotPlain("the head was called with more than the hidden states")
        if "hidden" in seen:
            raise _NotPlain("the head was called twice in one forward")
        seen["hidden"] = x
        return x

    head.forward = tap
    try:
        yield seen, forward
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward


class _NotPlain(Exception):
    """The model uses its head in a way the scored loss does not reproduce."""


def targets_of(labels: torch.Tensor, positions: int) -> torch.Tensor:
    """Each position's target: the next label (the causal shift), ``-100`` for
    the last; ``positions - labels.shape[1]`` leading positions that the model
    put in front of the input (a soft prompt) are ignored."""
    extra = positions - labels.shape[1]
    if extra > 0:
        labels = torch.cat([labels.new_full((labels.shape[0], extra), IGNORE), labels], 1)
    return F.pad(labels, (0, 1), value=IGNORE)[:, 1:]


def scored_rows(hidden: torch.Tensor, labels: torch.Tensor):
    """``(rows, targets)``: the hidden states (``(batch, positions, hidden)``) of
    the positions whose next token is scored, flattened, and those tokens."""
    targets = targets_of(labels, hidden.shape[1]).reshape(-1)
    keep = (targets != IGNORE).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep), \
        targets.index_select(0, keep)


class _ChunkedCE(torch.autograd.Function):
    """Mean cross-entropy of ``head(rows)`` against ``targets``, a chunk of rows at
    a time; the gradients (for ``rows`` and for ``params``, the trainable tensors
    the head uses) are taken per chunk in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, rows, targets, head, chunk, *params):
        n = rows.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows)
        grads: list[torch.Tensor | None] = [None] * len(params)
        for at in range(0, n, chunk):
            with torch.enable_grad():
                part = rows[at:at + chunk].detach().requires_grad_(True)
                logits = head(part)
                loss = F.cross_entropy(logits.float(), targets[at:at + chunk],
                                       reduction="sum")
                got = torch.autograd.grad(loss, [part, *params], allow_unused=True)
            total += loss.detach()
            grad_rows[at:at + chunk] = got[0]
            for i, g in enumerate(got[1:]):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
            del logits, loss, got
        ctx.n_params = len(params)
        ctx.save_for_backward(grad_rows, *[g if g is not None else torch.empty(0)
                                           for g in grads])
        ctx.has = [g is not None for g in grads]
        return total / n

    @staticmethod
    def backward(ctx, g):
        grad_rows, *grads = ctx.saved_tensors
        n = grad_rows.shape[0]
        scale = g / n
        out = [(p * scale).to(p.dtype) if has else None for p, has in zip(grads, ctx.has)]
        return ((grad_rows * scale).to(grad_rows.dtype), None, None, None, *out)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: float32 logits of at most :data:`CHUNK_VALUES` values."""
    return max(16, CHUNK_VALUES // max(vocab, 1))


def scored_ce(rows: torch.Tensor, targets: torch.Tensor, head, params=(),
              chunk: int | None = None) -> torch.Tensor:
    """The mean cross-entropy of ``head(rows)`` (``(n, hidden)``) against
    ``targets`` (``(n,)``, none ignored), never holding more than one chunk's
    logits; differentiable in ``rows`` and in ``params``."""
    if rows.shape[0] == 0:
        raise ValueError("no scored position in the batch")
    if chunk is None:
        out = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None)
        chunk = chunk_rows(int(out) if out else 65536)
    if torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad
                                                              for p in params)):
        return _ChunkedCE.apply(rows, targets, head, chunk, *params)
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    for at in range(0, rows.shape[0], chunk):
        total += F.cross_entropy(head(rows[at:at + chunk]).float(), targets[at:at + chunk],
                                 reduction="sum")
    return total / rows.shape[0]


class ScoredLoss:
    """``loss(forward, batch)``: the batch's causal-LM loss computed from the head
    at scored positions only (see the module docstring). ``params``: the
    model's trainable tensors (the ones the head uses get their gradient)."""

    #: the largest relative difference from the model's own loss that the first
    #: batch's check accepts (float32 rounding; bfloat16 logits round coarser)
    TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

    def __init__(self, model: nn.Module, params: list[torch.Tensor]):
        self.model, self.head = model, find_head(model)
        self.params = list(params)
        self.used: list[torch.Tensor] | None = None  # the params the head uses
        self.checked = False
        self.why_not: str | None = None if self.head is not None else \
            "the model has no lm_head / get_output_embeddings()"

    @property
    def active(self) -> bool:
        return self.why_not is None

    def _hidden(self, forward, batch):
        rest = {k: v for k, v in batch.items() if k != "labels"}
        with _tapped(self.head) as (seen, head_forward):
            output = forward(**rest)
        hidden = seen.get("hidden")
        if hidden is None:
            raise _NotPlain("the model's forward did not call its head")
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, dict):
            logits = output.get("logits")
        if logits is not hidden:
            raise _NotPlain("the model changes its logits after the head")
        return hidden, head_forward

    def _params_of(self, head_forward, hidden) -> list[torch.Tensor]:
        """The trainable tensors that the head's output depends on (found once)."""
        if self.used is None:
            trainable = [p for p in self.params if p.requires_grad]
            if not trainable:
                self.used = []
            else:
                with torch.enable_grad():
                    probe = hidden[:1, :1].detach()
                    out = head_forward(probe)
                    got = torch.autograd.grad(out.float().sum(), trainable,
                                              allow_unused=True) if out.requires_grad else \
                        [None] * len(trainable)
                self.used = [p for p, g in zip(trainable, got) if g is not None]
        return self.used

    def loss(self, forward, batch: dict) -> SimpleNamespace:
        """The loss of ``batch`` (with ``labels``) through ``forward`` (the model,
        or its DDP wrapper); ``logits`` of the result are the hidden states."""
        if not self.checked:
            self.checked = True
            self._check(forward, batch)
        if not self.active:
            return forward(**batch)
        hidden, head_forward = self._hidden(forward, batch)
        rows, targets = scored_rows(hidden, batch["labels"])
        if rows.shape[0] == 0:  # nothing scored (a stand-in row): zero, still a graph
            return SimpleNamespace(loss=hidden.float().sum() * 0.0, logits=hidden)
        params = self._params_of(head_forward, hidden) if torch.is_grad_enabled() else []
        loss = scored_ce(rows, targets, head_forward, params)
        return SimpleNamespace(loss=loss, logits=hidden)

    def _check(self, forward, batch: dict) -> None:
        """Compare with the model's own loss on the first row that scores; in eval
        mode (no dropout: both see one function) and drawing no random numbers
        (a resumed run's trajectory is the uninterrupted one's)."""
        if self.why_not is not None:
            return
        modes = [(m, m.training) for m in self.model.modules()]
        devices = sorted({p.device.index for p in self.model.parameters()
                          if p.device.type == "cuda"})
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                self.model.eval()
                self._compare(forward, batch)
        finally:
            for m, training in modes:
                m.training = training

    def _compare(self, forward, batch: dict) -> None:
        labels = batch["labels"]
        row = int((labels[:, 1:] != IGNORE).any(1).float().argmax())
        one = {k: (v[row:row + 1] if v.dim() and v.shape[0] == labels.shape[0] else v)
               for k, v in batch.items()}
        try:
            own = forward(**one)
            expected = float(loss_of(own))
            hidden, head_forward = self._hidden(forward, one)
        except _NotPlain as exc:
            self.why_not = str(exc)
            return
        got = float(scored_ce(*scored_rows(hidden, one["labels"]), head_forward))
        dtype = torch.bfloat16 if torch.is_autocast_enabled(hidden.device.type) or \
            hidden.dtype == torch.bfloat16 else torch.float32
        if abs(got - expected) > self.TOLERANCE[dtype] * max(abs(expected), 1e-3):
            self.why_not = (f"the model's own loss ({expected:.6g}) differs from the head's "
                            f"cross-entropy ({got:.6g}): it does more than a plain head")
