"""Starting a server: the model and its adapters loaded, the engine started,
the app served by uvicorn until SIGTERM or Ctrl-C.

On SIGTERM uvicorn stops accepting connections and lets the ones in flight
finish (up to ``grace`` seconds, ``timeout_graceful_shutdown``); then the
engine stops and :func:`serve` returns (the command exits 0).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from peftspec.core.errors import PeftspecError
from peftspec.core.patching import merge as merge_into_base
from peftspec.core.registry import registry_or_default
from peftspec.generate import is_transformers
from peftspec.models.tokenizer import tokenizer_for
from peftspec.serve.adapters import AdapterSet
from peftspec.serve.app import MISSING, Limits, build_app
from peftspec.serve.engine import Engine
from peftspec.serve.metrics import Metrics


@dataclass
class Loaded:
    engine: Engine
    base_name: str
    notes: list[str] = field(default_factory=list)


def stop_ids(tokenizer, model) -> set[int]:
    """The tokens that end an answer: the tokenizer's end of text and the
    generation config's end-of-sequence ids."""
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return ids


def start(source: str | None, adapters: dict[str, Path], adapter_dir: Path | None = None, *,
          registry=None, max_batch: int = 16, max_queue: int = 64,
          model=None, tokenizer=None, base_name: str | None = None,
          merge: bool = False) -> Loaded:
    """Load ``source`` (or take ``model``/``tokenizer``), each adapter by name, and
    start the engine.

    ``merge``: one adapter, folded into the base weights once: the server then
    serves that adapter alone (under its name) at the base model's speed, and
    loads nothing at run time."""
    # everything below runs on the engine's thread, which then schedules
    # (peftspec.serve.engine: one thread for all of a server's torch work)
    box: dict = {}
    ready = threading.Event()

    def body():
        try:
            box["loaded"] = _load(source, adapters, adapter_dir, registry, max_batch, max_queue,
                                  model, tokenizer, base_name, merge)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            box["error"] = exc
            return
        finally:
            ready.set()
        box["loaded"].engine.run()

    threading.Thread(target=body, name="peftspec-serve", daemon=True).start()
    ready.wait()
    if "error" in box:
        raise box["error"]
    return box["loaded"]


def _load(source, adapters, adapter_dir, registry, max_batch, max_queue, model, tokenizer,
          base_name, merge) -> Loaded:
    registry = registry_or_default(registry)
    if model is None:
        model = registry.load_model(source)
    if not is_transformers(model):
        raise PeftspecError(f"peftspec serve needs a transformers causal LM (hf:, gguf:, "
                            f"smollm2); {source or 'default'} is a {type(model).__name__}")
    tokenizer = tokenizer if tokenizer is not None else tokenizer_for(source, model)
    model.eval()
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise PeftspecError(f"--adapter-dir {adapter_dir}: no such folder")
    if merge and (len(adapters) != 1 or adapter_dir is not None):
        raise PeftspecError("--merge serves one adapter merged into the base: give exactly "
                            "one --adapter and no --adapter-dir")
    served = AdapterSet(model, registry, adapter_dir)
    for name, path in adapters.items():
        served.load(name, Path(path))
    if merge:
        (name,) = adapters
        merge_into_base(model)
        served.files.clear()
        base_name = base_name or name
    engine = Engine(model, tokenizer, served, max_batch=max_batch, max_queue=max_queue,
                    metrics=Metrics(), stops=stop_ids(tokenizer, model), own_thread=False)
    return Loaded(engine, base_name or source or "default")


def serve(loaded: Loaded, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits = Limits(), grace: float = 30.0, log_level: str = "info") -> None:
    """Serve until stopped; returns after a graceful shutdown."""
    try:
        import uvicorn
    except ImportError:
        raise PeftspecError(MISSING) from None
    app = build_app(loaded.engine, loaded.base_name, limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(grace), lifespan="off")
    engine = loaded.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            with engine.lock:  # /health says so; a request that slips in gets 503
                engine.accepting = False
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                # uvicorn re-raises the signal after its graceful shutdown (the
                # process then dies of SIGTERM); a drained server exits 0 instead
                captured.pop()

    try:
        Server(config).run()
    finally:
        loaded.engine.drain(timeout=grace)
        loaded.engine.close()
