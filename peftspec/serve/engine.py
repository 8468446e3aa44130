"""The scheduler: one thread owns the model and decodes every active request
together, one forward pass per step (iteration-level scheduling).

Each step it admits waiting requests (each prefilled alone, through its own
adapter, into a key/value cache of its own), then runs one batched forward of
every active sequence's last token, row ``i`` through its request's adapter
(the base, one adapter, or :func:`peftspec.core.rows.rows` for a mix), with
the sequences' caches left-padded into one. A request that finishes, is
cancelled (its client went away) or fails leaves before the next step; an
exception in a batched step is retried row by row, so it fails only the
request that raised it.

Nothing here knows HTTP: :class:`Request` carries callbacks, which the web
layer turns into an asyncio queue per request.

Every torch call of a server runs on this one thread: the model's loading
(:func:`peftspec.serve.server.start` runs it here), the steps, and the loads and
unloads at run time (:meth:`Engine.call`). A second thread that ran torch's
parallel kernels would give OpenMP (libgomp) a second thread team, more
threads than this CPU has cores, and libgomp then stops spinning between
kernels: measured on SmolLM2 over an nf4 base, 118 ms a step on a second
thread against 88 ms where only one thread ever ran torch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from peftspec.serve.adapters import AdapterSet, ServeError
from peftspec.serve.metrics import Metrics
from peftspec.generate import adapters_for  # the same dispatch as generate
from peftspec.serve.sampling import batched_cache, cache_arg, layers_of, pick


@dataclass
class Request:
    """One generation: ``on_text(delta)`` for each piece of new text,
    ``on_done(finish_reason, error)`` once at the end (``finish_reason``:
    ``stop``, ``length``, ``cancelled`` or ``error``)."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    on_text: Callable[[str], None]
    on_done: Callable[[str, Exception | None], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # filled by the engine
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` handed to on_text
    cancelled: bool = False
    kv: list | None = None
    length: int = 0
    generator: torch.Generator | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    def cancel(self) -> None:
        """Leave at the next step (a disconnected client); thread-safe."""
        self.cancelled = True


def _shutting_down() -> ServeError:
    return ServeError("the server is shutting down", status=503, kind="server_error",
                      code="shutting_down")


class Engine:
    """Owns ``model``; :meth:`submit` requests from any thread."""

    def __init__(self, model, tokenizer, adapters: AdapterSet, *, max_batch: int = 16,
                 max_queue: int = 64, metrics: Metrics | None = None, stops: set[int] = (),
                 own_thread: bool = True):
        """``own_thread=False``: the caller's thread is the engine's, and it runs
        :meth:`run` itself (:func:`peftspec.serve.server.start`, after loading)."""
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.stops = set(stops)
        self.arg = cache_arg(model)
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.lock = threading.Condition()
        self.model_lock = threading.Lock()  # steps, loads and unloads take turns
        self.accepting = True
        self.stopped = False
        self.tasks: deque[tuple[Callable, Future]] = deque()  # run between steps
        if own_thread:
            self.thread = threading.Thread(target=self.run, name="peftspec-serve", daemon=True)
            self.thread.start()
        else:
            self.thread = threading.current_thread()

    def call(self, fn: Callable):
        """``fn()`` on the engine's thread, between two steps; its result, or its
        exception raised here. Thread-safe; from the engine's thread it just runs."""
        if threading.current_thread() is self.thread:
            return fn()
        done: Future = Future()
        with self.lock:
            if self.stopped:
                raise _shutting_down()
            self.tasks.append((fn, done))
            self.lock.notify()
        return done.result()

    # ---- from any thread
    def submit(self, req: Request) -> None:
        with self.lock:
            if not self.accepting:
                raise ServeError("the server is shutting down; retry on another instance",
                                 status=503, kind="server_error", code="shutting_down")
            if req.adapter is not None and req.adapter not in self.adapters.files:
                raise ServeError(f"model {req.adapter!r} is not served here", param="model",
                                 status=404, code="model_not_found")
            if len(self.waiting) >= self.max_queue:
                raise ServeError(f"the queue is full ({self.max_queue} waiting requests); "
                                 "retry later", status=429, kind="rate_limit_error",
                                 code="queue_full", headers={"Retry-After": "1"})
            self.waiting.append(req)
            self.metrics.queue_depth = len(self.waiting)
            self.lock.notify()

    def in_flight(self) -> int:
        with self.lock:
            return len(self.waiting) + len(self.active)

    def uses(self, name: str) -> int:
        with self.lock:
            return sum(r.adapter == name for r in [*self.waiting, *self.active])

    def drain(self, timeout: float) -> bool:
        """Stop accepting; wait up to ``timeout`` s for the requests in flight."""
        with self.lock:
            self.accepting = False
        end = time.monotonic() + timeout
        while self.in_flight() and time.monotonic() < end:
            time.sleep(0.02)
        return not self.in_flight()

    def close(self) -> None:
        with self.lock:
            self.stopped = True
            self.accepting = False
            self.lock.notify()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        for req in [*self.waiting, *self.active]:
            req.on_done("cancelled", None)

    # ---- the scheduler thread
    def run(self) -> None:
        """The scheduler's loop, until :meth:`close`."""
        while True:
            with self.lock:
                while (not self.stopped and not self.waiting and not self.active
                       and not self.tasks):
                    self.lock.wait()
                if self.stopped:
                    for _fn, done in self.tasks:
                        done.set_exception(_shutting_down())
                    self.tasks.clear()
                    return
                tasks, self.tasks = list(self.tasks), deque()
                while self.waiting and len(self.active) < self.max_batch:
                    self.active.append(self.waiting.popleft())
                self.metrics.queue_depth = len(self.waiting)
            for fn, done in tasks:
                try:
                    with self.model_lock:
                        done.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    done.set_exception(exc)
            if not self.active:
                continue
            with self.model_lock, torch.no_grad():
                self._step()

    def _step(self) -> None:
        for req in [r for r in self.active if r.cancelled]:
            self._finish(req, "cancelled")
        fresh = [r for r in self.active if r.kv is None]
        for req in fresh:
            self._guard(req, lambda r=req: self._prefill(r))
        going = [r for r in self.active if r.kv is not None and r not in fresh]
        if not going:
            return
        self.metrics.observe("batch_size", len(going))
        try:
            self._decode(going)
        except Exception:  # noqa: BLE001 - find the request that raised: row by row
            for req in going:
                self._guard(req, lambda r=req: self._decode([r]))

    def _guard(self, req: Request, work) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own
            self._finish(req, "error", exc)

    def _prefill(self, req: Request) -> None:
        if req.seed is not None:
            req.generator = torch.Generator().manual_seed(req.seed)
        ids = torch.tensor([req.prompt_ids], device=self.device)
        with adapters_for(self.model, [req.adapter], keep=True):
            out = self.model(input_ids=ids, use_cache=True)
        req.kv = [(k, v) for k, v in layers_of(out.past_key_values)]
        req.length = len(req.prompt_ids)
        self._emit(req, out.logits[0, -1])

    def _decode(self, batch: list[Request]) -> None:
        lengths = [r.length for r in batch]
        width = max(lengths)
        cache = batched_cache(self.model, [r.kv for r in batch], lengths)
        mask = torch.zeros(len(batch), width + 1, dtype=torch.long, device=self.device)
        for i, n in enumerate(lengths):
            mask[i, width - n:] = 1
        ids = torch.tensor([[r.ids[-1]] for r in batch], device=self.device)
        pos = torch.tensor([[n] for n in lengths], device=self.device)
        with adapters_for(self.model, [r.adapter for r in batch], keep=True):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                             use_cache=True, **{self.arg: cache})
        layers = layers_of(out.past_key_values)
        for i, (req, n) in enumerate(zip(batch, lengths)):
            req.kv = [(k[i:i + 1, :, width - n:], v[i:i + 1, :, width - n:])
                      for k, v in layers]
            req.length = n + 1
            self._emit(req, out.logits[i, -1])

    def _emit(self, req: Request, logits: torch.Tensor) -> None:
        """Sample the next token, hand on the new text, finish on a stop."""
        token = pick(logits, req.temperature, req.top_p, req.generator)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            self.metrics.observe("time_to_first_token_seconds", req.first_token_at - req.started)
        if token in self.stops:
            return self._finish(req, "stop")
        req.ids.append(token)
        self.metrics.count("completion_tokens_total")
        req.text = self.tokenizer.decode_clean(req.ids)
        for s in req.stop:
            at = req.text.find(s, max(0, req.sent - len(s)))
            if at >= 0:
                req.text = req.text[:at]
                self._send(req, final=True)
                return self._finish(req, "stop")
        self._send(req)
        if len(req.ids) >= req.max_tokens:
            self._finish(req, "length")

    def _send(self, req: Request, final: bool = False) -> None:
        text = req.text
        if not final:  # hold back a partial UTF-8 character and a possible stop's start
            text = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in req.stop), default=0)
            text = text[:max(req.sent, len(text) - hold)]
        if len(text) > req.sent:
            req.on_text(text[req.sent:])
            req.sent = len(text)

    def _finish(self, req: Request, reason: str, error: Exception | None = None) -> None:
        if reason in ("length",) or (reason == "stop" and req.sent < len(req.text)):
            self._send(req, final=True)
        with self.lock:
            if req in self.active:
                self.active.remove(req)
        req.kv = None
        self.metrics.count("requests_finished_total", reason=reason)
        self.metrics.observe("request_seconds", time.monotonic() - req.started)
        req.on_done(reason, error)
