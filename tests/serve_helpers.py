"""Shared by the serve tests: random adapters for the tiny chat Llama, and a
real server (uvicorn on a free port, in a thread of this process)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

import peftspec

LORA = '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.v_proj"]\nr = 4\n'
DORA = LORA + "dora = true\n"
BOTTLENECK = '[[augment]]\nmethod = "bottleneck"\npreset = "houlsby"\nsize = 8\n'
PROMPT = '[prefix]\nmethod = "prompt-tuning"\ntokens = 4\n'


def make_adapter(source: str, spec_text: str, path: Path, seed: int, registry,
                 scale: float = 0.5) -> Path:
    """An adapter whose every trainable tensor is random (so it changes the output)."""
    model = registry.load_model(source)
    peftspec.apply(peftspec.parse_spec(spec_text), model, registry=registry)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftspec.trainable_parameters(model).values():
            p.copy_(p + torch.randn(p.shape, generator=gen) * scale)
    peftspec.save_adapter(model, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """``peftspec.serve`` served by uvicorn in a thread, on a free port."""

    def __init__(self, loaded, limits):
        import uvicorn

        from peftspec.serve.app import build_app

        self.loaded, self.limits, self.port = loaded, limits, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(loaded.engine, loaded.base_name, limits),
                                host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > end:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.loaded.engine.close()
