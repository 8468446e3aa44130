"""The OpenAI-compatible HTTP API over an :class:`~peftspec.serve.engine.Engine`,
as an ASGI app (Starlette, from the ``serve`` extra: ``pip install
'peftspec[serve]'``), and :func:`run`, which serves it with uvicorn.

Endpoints (vLLM's shapes for LoRA serving): ``GET /v1/models``; ``POST
/v1/completions`` and ``/v1/chat/completions`` (``stream: true`` as
server-sent events); ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``; ``GET /health``; ``GET /metrics``. Every error
is OpenAI's JSON: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from peftspec.core.errors import PeftspecError
from peftspec.serve import requests as parse
from peftspec.serve.adapters import ServeError, resolve_in
from peftspec.serve.engine import Engine, Request

MISSING = "peftspec serve needs its extra: pip install 'peftspec[serve]'"


@dataclass
class Limits:
    max_tokens: int = 1024  # the cap on a request's max_tokens
    default_max_tokens: int = 256
    max_body: int = 1 << 20  # bytes
    api_key: str | None = None


def require_extra():
    """A one-line error naming the extra when Starlette is not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PeftspecError(MISSING) from None


def error_body(exc: ServeError) -> dict:
    return {"error": {"message": str(exc), "type": exc.kind, "param": exc.param,
                      "code": exc.code or exc.status}}


def build_app(engine: Engine, base_name: str, limits: Limits = Limits()):
    """The ASGI app serving ``engine``'s model as ``base_name`` and its adapters."""
    require_extra()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    metrics = engine.metrics
    created = int(time.time())

    def fail(exc: ServeError, endpoint: str):
        metrics.count("requests_total", endpoint=endpoint, status=exc.status)
        return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)

    def ok(payload, endpoint: str):
        metrics.count("requests_total", endpoint=endpoint, status=200)
        return JSONResponse(payload)

    async def body_of(request) -> dict:
        key = limits.api_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            raise ServeError("missing or wrong API key: send 'Authorization: Bearer KEY'",
                             status=401, kind="authentication_error", code="invalid_api_key")
        if request.method != "POST":
            return {}
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
            raise _too_large()
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body:
                raise _too_large()
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServeError(f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ServeError("the request body must be a JSON object")
        return body

    def _too_large():
        return ServeError(f"the request body is over {limits.max_body} bytes", status=413,
                          code="body_too_large")

    def endpoint(name: str):
        def wrap(handler):
            async def route(request):
                try:
                    body = await body_of(request)
                    result = await handler(request, body)
                except ServeError as exc:
                    return fail(exc, name)
                if isinstance(result, (dict, list)):
                    return ok(result, name)
                metrics.count("requests_total", endpoint=name, status=200)
                return result
            return route
        return wrap

    def adapter_of(model: str) -> str | None:
        if model == base_name:
            return None
        if model not in engine.adapters.files:
            raise ServeError(f"model {model!r} is not served here; served: "
                             f"{', '.join([base_name, *engine.adapters.names()])}",
                             param="model", status=404, code="model_not_found")
        return model

    @endpoint("models")
    async def models(request, body):
        card = {"object": "model", "created": created, "owned_by": "peftspec"}
        return {"object": "list", "data": [
            {"id": base_name, **card, "root": base_name, "parent": None},
            *({"id": n, **card, "root": str(p.name), "parent": base_name}
              for n, p in engine.adapters.files.items())]}

    async def generation(request, body, chat: bool):
        s = parse.settings(body, limits.max_tokens, limits.default_max_tokens)
        adapter = adapter_of(s.model)
        tok = engine.tokenizer
        if chat:
            msgs = parse.messages(body)
            if not getattr(tok, "has_chat_template", False):
                raise ServeError(f"model {s.model!r} has no chat template; use "
                                 "/v1/completions", param="messages")
            ids = tok.encode(tok.render_chat(msgs, add_generation_prompt=True))
        else:
            ids = tok.encode(parse.prompt(body))
        if not ids:
            raise ServeError("the prompt has no tokens", param="prompt")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        req = Request(ids, adapter, s.max_tokens, on_text=lambda d: put(("text", d)),
                      on_done=lambda r, e: put(("done", (r, e))), temperature=s.temperature,
                      top_p=s.top_p, stop=s.stop, seed=s.seed)
        engine.submit(req)
        metrics.count("prompt_tokens_total", len(ids))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = _Shape(rid, s.model, chat, len(ids))
        if s.stream:
            return StreamingResponse(_events(queue, req, shape, s.include_usage),
                                     media_type="text/event-stream")
        parts = []
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        req.cancel()
                        raise ServeError("client disconnected", status=499) from None
                    continue
                if kind == "text":
                    parts.append(value)
                    continue
                reason, error = value
                if error is not None:
                    raise ServeError(f"generation failed: {type(error).__name__}: {error}",
                                     status=500, kind="server_error")
                return shape.whole("".join(parts), reason, len(req.ids))
        finally:
            req.cancel()  # a no-op once done

    @endpoint("chat_completions")
    async def chat_completions(request, body):
        return await generation(request, body, chat=True)

    @endpoint("completions")
    async def completions(request, body):
        return await generation(request, body, chat=False)

    @endpoint("load_lora_adapter")
    async def load_lora(request, body):
        name, path = body.get("lora_name"), body.get("lora_path")
        if name == base_name:
            raise ServeError(f"{name!r} is the base model's name", param="lora_name")
        full = resolve_in(engine.adapters.folder, path)

        # on the engine's thread, between steps (peftspec.serve.engine)
        await asyncio.to_thread(engine.call, lambda: engine.adapters.load(name, full))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @endpoint("unload_lora_adapter")
    async def unload_lora(request, body):
        name = body.get("lora_name")
        busy = engine.uses(name) if isinstance(name, str) else 0
        if busy:
            raise ServeError(f"adapter {name!r} has {busy} request(s) in flight; retry when "
                             "they finish", param="lora_name", status=409, code="in_use")

        await asyncio.to_thread(engine.call, lambda: engine.adapters.unload(name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def health(request):
        if not engine.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(request):
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def http_error(request, exc: HTTPException):
        return fail(ServeError(f"{request.method} {request.url.path}: {exc.detail}",
                               status=exc.status_code, code=exc.status_code), "other")

    app = Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_lora, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error})
    return app


@dataclass
class _Shape:
    """OpenAI's response objects for one request."""

    id: str
    model: str
    chat: bool
    prompt_tokens: int

    def usage(self, completion: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": int(time.time()), "model": self.model}

    def whole(self, text: str, reason: str, completion: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": reason, "logprobs": None}
            return {**self._head("chat.completion"), "choices": [choice],
                    "usage": self.usage(completion)}
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice],
                "usage": self.usage(completion)}

    def chunk(self, text: str | None, reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _events(queue: asyncio.Queue, req: Request, shape: _Shape, include_usage: bool):
    """Server-sent events of one streamed request; the generation is cancelled
    if the client goes away (the response task is cancelled, ``finally`` runs)."""
    try:
        if shape.chat:
            yield _sse(shape.chunk("", None, first=True))
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield _sse(shape.chunk(value, None))
                continue
            reason, error = value
            if error is not None:
                yield _sse({"error": {"message": f"generation failed: {type(error).__name__}: "
                                      f"{error}", "type": "server_error", "param": None,
                                      "code": 500}})
            else:
                yield _sse(shape.chunk(None, reason))
                if include_usage:
                    yield _sse({**shape._head(shape.chunk(None, None)["object"]),
                                "choices": [], "usage": shape.usage(len(req.ids))})
            yield "data: [DONE]\n\n"
            return
    finally:
        req.cancel()
