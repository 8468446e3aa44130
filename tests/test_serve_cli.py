"""``peftspec serve`` as a command: its help, the one-line error without the
extra, the warning beyond localhost without a key, and SIGTERM with a request
in flight (a real server in a subprocess: it finishes that request and exits 0)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from peftspec.cli import cli
from serve_helpers import free_port


def test_help_teaches():
    r = CliRunner().invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0
    for words in ("Examples:", "--adapter-dir", "/v1/chat/completions", "curl",
                  "peftspec[serve]"):
        assert words in r.output


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "starlette", None)
    r = CliRunner().invoke(cli, ["serve", "--model", "smollm2"])
    assert r.exit_code != 0
    assert "pip install 'peftspec[serve]'" in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1


def test_adapter_option_needs_name_and_file():
    r = CliRunner().invoke(cli, ["serve", "--adapter", "town.safetensors"])
    assert r.exit_code == 2 and "NAME=FILE" in r.output


def test_warns_beyond_localhost_without_a_key(monkeypatch):
    pytest.importorskip("starlette")
    from peftspec.core.errors import PeftspecError
    from peftspec.serve import server

    def refuse(*a, **k):
        raise PeftspecError("stopped here by the test")

    monkeypatch.setattr(server, "start", refuse)
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert "without --api-key" in r.output and "stopped here" in r.output
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--api-key", "k"])
    assert "without --api-key" not in r.output


@pytest.mark.slow  # a subprocess server: ~15 s of imports and model loading
def test_sigterm_finishes_the_request_in_flight_and_exits_0(tiny_chat_model):
    httpx = pytest.importorskip("httpx2")
    pytest.importorskip("uvicorn")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from peftspec.cli import main; main(sys.argv[1:])",
         "serve", "--model", f"hf:{tiny_chat_model}", "--port", str(port), "--grace", "30",
         "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < end, proc.stdout.read()
            time.sleep(0.2)
        first, events = threading.Event(), []

        def stream():
            body = {"model": "tiny", "prompt": "Once", "max_tokens": 200, "temperature": 0,
                    "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip())
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] in ("length", "stop")
    assert len(events) > 20  # the whole answer came, not a cut stream


def test_merge_serves_one_adapter_at_the_base_speed_with_its_answers(tiny_chat_model, tmp_path):
    pytest.importorskip("starlette")
    import peftspec
    from peftspec.core.errors import PeftspecError
    from peftspec.core.patching import is_patched
    from peftspec.generate import generate, load
    from peftspec.serve.engine import Request
    from peftspec.serve.server import start
    from serve_helpers import LORA
    from shared_helpers import make_adapter

    reg = peftspec.build_registry()
    source = f"hf:{tiny_chat_model}"
    path = make_adapter(source, LORA, tmp_path / "town.safetensors", 1, reg)
    session = load(source, [path], registry=reg)
    want = generate(session.model, session.tokenizer, ["Hi"], adapters=["town"],
                    max_new_tokens=8)[0]
    with pytest.raises(PeftspecError, match="exactly one --adapter"):
        start(source, {}, registry=reg, merge=True)
    loaded = start(source, {"town": path}, registry=reg, merge=True)
    try:
        assert loaded.base_name == "town" and not is_patched(loaded.engine.model)
        done = threading.Event()
        ids = session.tokenizer.encode_chat("Hi")
        req = Request(ids, None, 8, on_text=lambda d: None, on_done=lambda r, e: done.set())
        loaded.engine.submit(req)
        assert done.wait(30)
        assert tuple(req.ids) == want.ids
    finally:
        loaded.engine.close()
