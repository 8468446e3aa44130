"""Shared by the serve tests: adapter specs for the tiny chat Llama (random
adapter files: shared_helpers.make_adapter), and a real server (uvicorn on a
free port, in a thread of this process)."""

from __future__ import annotations

import socket
import threading
import time


LORA = '[[reparameterize]]\nmethod = "lora"\nmodules = ["**.q_proj", "**.v_proj"]\nr = 4\n'
DORA = LORA + "dora = true\n"
BOTTLENECK = '[[augment]]\nmethod = "bottleneck"\npreset = "houlsby"\nsize = 8\n'
PROMPT = '[prefix]\nmethod = "prompt-tuning"\ntokens = 4\n'


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
