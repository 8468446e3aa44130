"""``peftspec serve``: the base model and its adapters behind an OpenAI-compatible
API (:mod:`peftspec.serve`)."""

from __future__ import annotations

from pathlib import Path

import click

from peftspec.cli.common import MODEL_HELP, err, registry

LOCAL = ("127.0.0.1", "localhost", "::1")


def _adapter(ctx, param, values):
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{v!r}: give NAME=FILE, e.g. town=town.safetensors")
        out[name] = Path(path)
    return out


@click.command()
@click.option("--model", "-m", "model_source", default=None, metavar="M", help=MODEL_HELP)
@click.option("--adapter", "-a", "adapters", multiple=True, metavar="NAME=FILE",
              callback=_adapter, help="an adapter served as model NAME (repeatable)")
@click.option("--adapter-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the folder POST /v1/load_lora_adapter may load files from (nothing "
                   "outside it, no symbolic links)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="PEFTSPEC_API_KEY",
              help="require 'Authorization: Bearer KEY' on /v1 (env PEFTSPEC_API_KEY)")
@click.option("--served-model-name", default=None,
              help="the base model's name in the API [default: the --model value]")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="sequences decoded together per step")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="requests waiting beyond the batch; more get 429 with Retry-After")
@click.option("--max-tokens", "max_tokens_cap", type=click.IntRange(min=1), default=1024,
              show_default=True, help="the most max_tokens a request may ask for")
@click.option("--max-body", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="the largest request body, in bytes (larger: 413)")
@click.option("--merge", is_flag=True,
              help="one --adapter merged into the base once: served under its name at the "
                   "base's speed (the base itself and run-time loading are then not served)")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="seconds SIGTERM waits for the requests in flight")
def serve(model_source, adapters, adapter_dir, host, port, api_key, served_model_name,
          max_batch, max_queue, max_tokens_cap, max_body, merge, grace):
    """Serve the base model and adapters with an OpenAI-compatible API.

    \b
    Requests for different adapters (and the base) decode together, one
    forward pass per step, each row through its own adapter; a request joins
    at the next step and leaves when done. Endpoints: GET /v1/models, POST
    /v1/chat/completions and /v1/completions (model: the base's name or an
    adapter's; stream: true for server-sent events), POST
    /v1/load_lora_adapter and /v1/unload_lora_adapter (any servable method,
    files under --adapter-dir), GET /health, GET /metrics (Prometheus).
    Adapters that cannot share a batch (soft prompts, [[train]] rules) are
    refused with the reason. SIGTERM finishes the requests in flight, exits 0.
    Needs the serve extra: pip install 'peftspec[serve]'.
    \b
    Examples:
      peftspec serve --model smollm2 --adapter town=town.safetensors
      peftspec serve --model smollm2 --adapter-dir adapters/ --api-key s3cret
      peftspec serve --model smollm2 --adapter town=town.safetensors --merge
      curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "town", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from peftspec.serve.app import Limits, require_extra
    from peftspec.serve.server import serve as run, start

    require_extra()  # before minutes of loading
    if api_key is None and host not in LOCAL:
        err.print(f"[bold yellow]warning:[/] listening on {host} without --api-key: anyone "
                  "who can reach this port can use the model and load adapters")
    reg = registry()
    with err.status(f"loading model {model_source or 'default'}..."):
        loaded = start(model_source, adapters, adapter_dir, registry=reg, max_batch=max_batch,
                       max_queue=max_queue, base_name=served_model_name,
                       merge=merge)
    err.print(f"serving {loaded.base_name}"
              + (f" with {', '.join(adapters)}" if adapters else "")
              + f" on http://{host}:{port}/v1")
    run(loaded, host, port, Limits(max_tokens=max_tokens_cap, max_body=max_body,
                                   api_key=api_key), grace=grace)
