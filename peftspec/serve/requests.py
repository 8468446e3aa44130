"""The request bodies of the OpenAI API, checked field by field: every
problem is a :class:`ServeError` naming the field and what to give instead."""

from __future__ import annotations

from dataclasses import dataclass

from peftspec.serve.adapters import ServeError


@dataclass(frozen=True)
class Settings:
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or \
            not (lo < value if lo_open else lo <= value) or value > hi:
        span = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ServeError(f"'{key}' must be {'an integer' if integer else 'a number'} in "
                         f"{span}, got {value!r:.40}", param=key)
    return value


def settings(body: dict, max_tokens_cap: int, default_max_tokens: int) -> Settings:
    """The generation settings every completion request shares."""
    if not isinstance(body, dict):
        raise ServeError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ServeError("'model' is required: the base model's name or an adapter's "
                         "(GET /v1/models lists them)", param="model")
    n = body.get("n", 1)
    if n != 1:
        raise ServeError(f"'n' must be 1 (one choice per request), got {n!r:.40}", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens",
                         min(default_max_tokens, max_tokens_cap), 1, max_tokens_cap,
                         integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and \
            all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise ServeError("'stop' must be a string or a list of up to 4 non-empty strings",
                         param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ServeError(f"'seed' must be an integer, got {seed!r:.40}", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ServeError("'stream_options' must be an object", param="stream_options")
    return Settings(model, max_tokens,
                    float(_number(body, "temperature", 1.0, 0, 2)),
                    float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
                    stop, seed, stream, bool(options.get("include_usage", False)))


def messages(body: dict) -> list[dict]:
    """The chat's messages as the chat template takes them."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ServeError("'messages' must be a non-empty list of {\"role\", \"content\"} "
                         "objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text" and
                       isinstance(p.get("text"), str) for p in content):
                raise ServeError(f"messages[{i}].content: only text parts are supported",
                                 param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ServeError(f"messages[{i}] must have a role (system, user or assistant) "
                             "and a string content", param=f"messages[{i}]")
        out.append({"role": role, "content": content})
    return out


def prompt(body: dict) -> str:
    """A completion's prompt: a string (or a list holding one)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str) or not p:
        raise ServeError("'prompt' must be a non-empty string (one prompt per request)",
                         param="prompt")
    return p
