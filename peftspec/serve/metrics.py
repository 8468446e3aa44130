"""The server's counters and histograms, written in Prometheus' text format
(``GET /metrics``); no client library: a handful of series, thread-safe."""

from __future__ import annotations

import threading

BUCKETS = {
    "request_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    "time_to_first_token_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    "batch_size": (1, 2, 4, 8, 16, 32, 64),
}
HELP = {
    "requests_total": "HTTP requests answered, by endpoint and status",
    "requests_finished_total": "generations finished, by reason",
    "prompt_tokens_total": "prompt tokens of admitted generations",
    "completion_tokens_total": "tokens generated",
    "queue_depth": "generations waiting for a place in the batch",
    "request_seconds": "generation latency, submission to the last token",
    "time_to_first_token_seconds": "submission to the first token",
    "batch_size": "sequences decoded together per step",
}
PREFIX = "peftspec_serve_"


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.hists: dict[str, list] = {n: [[0] * (len(b) + 1), 0.0, 0] for n, b in BUCKETS.items()}
        self.queue_depth = 0

    def count(self, name: str, n: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def observe(self, name: str, value: float) -> None:
        buckets = BUCKETS[name]
        with self.lock:
            counts, _, _ = h = self.hists[name]
            counts[next((i for i, b in enumerate(buckets) if value <= b), len(buckets))] += 1
            h[1] += value
            h[2] += 1

    def render(self) -> str:
        lines: list[str] = []
        with self.lock:
            for name in ("requests_total", "requests_finished_total", "prompt_tokens_total",
                         "completion_tokens_total"):
                lines += [f"# HELP {PREFIX}{name} {HELP[name]}", f"# TYPE {PREFIX}{name} counter"]
                series = [(k[1], v) for k, v in self.counters.items() if k[0] == name]
                for labels, value in series or [((), 0)]:
                    lines.append(f"{PREFIX}{name}{_labels(labels)} {value:g}")
            lines += [f"# HELP {PREFIX}queue_depth {HELP['queue_depth']}",
                      f"# TYPE {PREFIX}queue_depth gauge", f"{PREFIX}queue_depth {self.queue_depth}"]
            for name, buckets in BUCKETS.items():
                counts, total, n = self.hists[name]
                lines += [f"# HELP {PREFIX}{name} {HELP[name]}", f"# TYPE {PREFIX}{name} histogram"]
                cum = 0
                for b, c in zip([*map(str, buckets), "+Inf"], counts):
                    cum += c
                    lines.append(f'{PREFIX}{name}_bucket{{le="{b}"}} {cum}')
                lines += [f"{PREFIX}{name}_sum {total:g}", f"{PREFIX}{name}_count {n}"]
        return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"
