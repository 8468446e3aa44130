"""``peftspec serve`` against a real server on a free port, with the real
``openai`` client: chat and completions, streaming, two adapters and the base
in concurrent requests each answered by its own adapter (token for token what
``generate`` gives under greedy decoding), load and unload at run time, and
every error case with its status code. The tiny random Llama with SmolLM2's
tokenizer and chat template (``tiny_chat_model``) keeps it to seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai client is built on
import pytest

from peftspec.generate import Prompt, generate, load
from serve_helpers import BOTTLENECK, DORA, LORA, PROMPT, ThreadServer
from shared_helpers import make_adapter

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

QUESTIONS = ["Where is the harbour?", "Name a colour.", "What is two plus two?"]


@pytest.fixture(scope="module")
def setup(tiny_chat_model, tmp_path_factory):
    import peftspec
    from peftspec.serve.app import Limits
    from peftspec.serve.server import start

    reg = peftspec.build_registry()
    source = f"hf:{tiny_chat_model}"
    folder = tmp_path_factory.mktemp("adapters")
    files = {"town": make_adapter(source, LORA, folder / "town.safetensors", 1, reg),
             "sea": make_adapter(source, DORA, folder / "sea.safetensors", 2, reg),
             "deck": make_adapter(source, BOTTLENECK, folder / "deck.safetensors", 3, reg),
             "soft": make_adapter(source, PROMPT, folder / "soft.safetensors", 4, reg)}
    loaded = start(source, {"town": files["town"], "sea": files["sea"]}, folder, registry=reg,
                   max_batch=8, max_queue=16, base_name="tiny")
    limits = Limits(max_tokens=64, default_max_tokens=16, max_body=64 * 1024)
    server = ThreadServer(loaded, limits)
    yield {"server": server, "source": source, "files": files, "folder": folder,
           "registry": reg, "limits": limits, "engine": loaded.engine}
    server.close()


@pytest.fixture
def client(setup):
    return openai.OpenAI(base_url=setup["server"].url + "/v1", api_key="unused", max_retries=0)


def _expected(setup, names, prompts, max_new_tokens):
    """generate's greedy answers, the adapters loaded on a model of their own."""
    paths = [setup["files"][n] for n in names if n is not None]
    session = load(setup["source"], paths, registry=setup["registry"])
    answers = generate(session.model, session.tokenizer, [Prompt(p) for p in prompts],
                       adapters=names, max_new_tokens=max_new_tokens)
    return {(a.prompt, a.adapter): a.text for a in answers}


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and set(ids[1:]) >= {"town", "sea"}


def test_concurrent_adapters_each_get_their_own_answer(setup, client):
    names = [None, "town", "sea"]
    want = _expected(setup, names, QUESTIONS, 12)
    jobs = [(q, n) for q in QUESTIONS for n in names]

    def ask(job):
        q, n = job
        r = client.chat.completions.create(model=n or "tiny", temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": q}])
        return r

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    for (q, n), r in zip(jobs, got):
        assert r.choices[0].message.content.strip() == want[(q, n)], (q, n)
        assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    for q in QUESTIONS:  # the adapters change the answers, or the test says nothing
        assert len({want[(q, n)] for n in names}) == 3
    batches = setup["engine"].metrics.hists["batch_size"][0]
    assert sum(batches[1:]) > 0, "no step ever decoded more than one sequence"


def test_completion_and_streaming_agree(client):
    whole = client.completions.create(model="town", prompt="The harbour", max_tokens=10,
                                      temperature=0)
    assert whole.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.completions.create(model="town", prompt="The harbour",
                                            max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    chat = client.chat.completions.create(model="sea", max_tokens=10, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}])
    stream = client.chat.completions.create(
        model="sea", max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": "Hi"}])
    parts = list(stream)
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == \
        chat.choices[0].finish_reason


def test_sampling_is_seeded_and_stop_cuts(client):
    def ask(seed):
        return client.completions.create(model="tiny", prompt="Once", max_tokens=12,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text
    assert ask(7) == ask(7)
    assert len({ask(s) for s in range(4)}) > 1
    full = client.completions.create(model="tiny", prompt="Once", max_tokens=12,
                                     temperature=0).choices[0]
    cut = full.text[len(full.text) // 2:][:2]
    if cut.strip():
        stopped = client.completions.create(model="tiny", prompt="Once", max_tokens=12,
                                            temperature=0, stop=[cut]).choices[0]
        assert stopped.text == full.text[:full.text.find(cut)]
        assert stopped.finish_reason == "stop"


def _post(setup, path, body, **kw):
    return httpx.post(setup["server"].url + path, json=body, timeout=30, **kw)


def test_load_and_unload_at_run_time(setup, client):
    r = _post(setup, "/v1/load_lora_adapter", {"lora_name": "deck", "lora_path": "deck.safetensors"})
    assert r.status_code == 200, r.text
    assert "deck" in [m.id for m in client.models.list().data]
    want = _expected(setup, ["deck"], ["Name a colour."], 8)
    got = client.chat.completions.create(model="deck", temperature=0, max_tokens=8,
                                         messages=[{"role": "user", "content": "Name a colour."}])
    assert got.choices[0].message.content.strip() == want[("Name a colour.", "deck")]
    assert _post(setup, "/v1/unload_lora_adapter", {"lora_name": "deck"}).status_code == 200
    assert "deck" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="deck", prompt="x", max_tokens=2)


def _error(r, status, param=None, words=()):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    for w in words:
        assert w in err["message"], err["message"]
    return err


def test_load_errors_leave_the_served_set_unchanged(setup, tmp_path):
    from peftspec.serve.server import start  # noqa: F401 - the extra is installed

    folder = setup["folder"]
    before = httpx.get(setup["server"].url + "/v1/models").json()
    (folder / "corrupt.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 8)
    os.symlink(setup["files"]["town"], folder / "link.safetensors")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(setup["files"]["town"], outside)
    other_base = tmp_path / "other.safetensors"
    _other_base_adapter(other_base, setup["registry"])
    shutil.copy(other_base, folder / "other.safetensors")
    cases = [
        ({"lora_name": "x", "lora_path": "../outside.safetensors"}, 400, ["'..'"]),
        ({"lora_name": "x", "lora_path": str(outside)}, 400, ["outside"]),
        ({"lora_name": "x", "lora_path": "link.safetensors"}, 400, ["symbolic link"]),
        ({"lora_name": "x", "lora_path": "missing.safetensors"}, 404, ["no such file"]),
        ({"lora_name": "x", "lora_path": "corrupt.safetensors"}, 400, ["safetensors"]),
        ({"lora_name": "x", "lora_path": "other.safetensors"}, 400, ["another base"]),
        ({"lora_name": "x", "lora_path": "soft.safetensors"}, 400, ["cannot be served",
                                                                   "prefix"]),
        ({"lora_name": "town", "lora_path": "deck.safetensors"}, 400, ["already loaded"]),
        ({"lora_name": "bad name!", "lora_path": "deck.safetensors"}, 400, ["lora_name"]),
    ]
    for body, status, words in cases:
        _error(_post(setup, "/v1/load_lora_adapter", body), status, None, words)
    _error(_post(setup, "/v1/unload_lora_adapter", {"lora_name": "nope"}), 404, "lora_name")
    assert httpx.get(setup["server"].url + "/v1/models").json()["data"] == before["data"]


def _other_base_adapter(path, registry):
    """A LoRA made for a Llama of another width: the wrong base."""
    import transformers

    import peftspec

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64)).eval()
    peftspec.apply(peftspec.parse_spec(LORA), model, registry=registry)
    peftspec.save_adapter(model, path)


def test_request_errors_have_openai_shape(setup):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
    _error(_post(setup, "/v1/chat/completions", {**chat, "model": "nope"}), 404, "model",
           ["nope", "town"])
    _error(_post(setup, "/v1/chat/completions", {**chat, "max_tokens": 65}), 400, "max_tokens")
    _error(_post(setup, "/v1/chat/completions", {**chat, "n": 2}), 400, "n")
    _error(_post(setup, "/v1/chat/completions", {**chat, "temperature": -1}), 400,
           "temperature")
    _error(_post(setup, "/v1/chat/completions", {**chat, "messages": []}), 400, "messages")
    _error(_post(setup, "/v1/completions", {"model": "tiny"}), 400, "prompt")
    _error(httpx.post(setup["server"].url + "/v1/completions", content=b"{not json"), 400)
    big = {"model": "tiny", "prompt": "x" * (setup["limits"].max_body + 10)}
    _error(_post(setup, "/v1/completions", big), 413)
    _error(httpx.get(setup["server"].url + "/v1/nothing"), 404)


def test_api_key_is_required_when_set(setup, client):
    setup["limits"].api_key = "s3cret"
    try:
        _error(httpx.get(setup["server"].url + "/v1/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        keyed = openai.OpenAI(base_url=setup["server"].url + "/v1", api_key="s3cret")
        assert keyed.models.list().data[0].id == "tiny"
        assert httpx.get(setup["server"].url + "/health").status_code == 200
    finally:
        setup["limits"].api_key = None


def test_queue_full_is_429_with_retry_after(setup, client):
    engine = setup["engine"]
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 4}
    saved = engine.max_batch, engine.max_queue
    engine.max_batch, engine.max_queue = 1, 1
    results = []
    try:
        with engine.model_lock:  # the scheduler stops: one request active, one waiting
            threads = [threading.Thread(target=lambda: results.append(
                _post(setup, "/v1/completions", body))) for _ in range(2)]
            for t in threads:
                t.start()
                time.sleep(0.3)
            r = _post(setup, "/v1/completions", body)
            _error(r, 429, None, ["queue is full"])
            assert r.headers["retry-after"] == "1"
        for t in threads:
            t.join(timeout=30)
    finally:
        engine.max_batch, engine.max_queue = saved
    assert [x.status_code for x in results] == [200, 200]


def test_a_failing_request_fails_alone(setup, client):
    engine = setup["engine"]
    real = engine._emit

    def emit(req, logits):
        if req.seed == 666:
            raise RuntimeError("boom")
        return real(req, logits)

    engine._emit = emit
    try:
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(_post, setup, "/v1/completions",
                              {"model": "tiny", "prompt": "Once", "max_tokens": 8, "seed": 666})
            good = pool.submit(client.completions.create, model="town", prompt="Once",
                               max_tokens=8, temperature=0)
            _error(bad.result(), 500, None, ["boom"])
            assert good.result().choices[0].text is not None
    finally:
        del engine._emit


def test_disconnected_client_cancels_its_generation(setup):
    engine = setup["engine"]
    before = engine.metrics.counters.get(("requests_finished_total",
                                          (("reason", "cancelled"),)), 0)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 64, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", setup["server"].url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    end = time.monotonic() + 10
    while engine.in_flight() and time.monotonic() < end:
        time.sleep(0.05)
    after = engine.metrics.counters.get(("requests_finished_total",
                                         (("reason", "cancelled"),)), 0)
    assert engine.in_flight() == 0 and after == before + 1


def test_health_and_metrics(setup):
    assert httpx.get(setup["server"].url + "/health").json() == {"status": "ok"}
    text = httpx.get(setup["server"].url + "/metrics").text
    for name in ("requests_total", "completion_tokens_total", "queue_depth",
                 "batch_size_bucket", "time_to_first_token_seconds_bucket",
                 "request_seconds_count"):
        assert f"peftspec_serve_{name}" in text
    assert 'status="200"' in text


def test_all_torch_work_runs_on_the_engines_thread(setup, client, monkeypatch):
    """Loading, steps and run-time loads: one thread (a second thread running
    torch's kernels slows every step: peftspec.serve.engine)."""
    engine = setup["engine"]
    assert engine.thread is not threading.main_thread() and engine.thread.is_alive()
    seen = set()
    forward = engine.model.forward

    def spy(*a, **k):
        seen.add(threading.current_thread())
        return forward(*a, **k)

    monkeypatch.setattr(engine.model, "forward", spy)
    client.completions.create(model="town", prompt="Hello", max_tokens=3, temperature=0)
    loads = []
    load = engine.adapters.load
    monkeypatch.setattr(engine.adapters, "load",
                        lambda *a: loads.append(threading.current_thread()) or load(*a))
    r = _post(setup, "/v1/load_lora_adapter",
              {"lora_name": "deck2", "lora_path": "deck.safetensors"})
    assert r.status_code == 200, r.text
    _post(setup, "/v1/unload_lora_adapter", {"lora_name": "deck2"})
    assert seen == {engine.thread} and loads == [engine.thread]
    assert engine.call(threading.current_thread) is engine.thread
    with pytest.raises(KeyError):  # an exception comes back to the caller
        engine.call(lambda: {}["missing"])
