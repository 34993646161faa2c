"""Prometheus metrics of the server, at GET /metrics (text exposition format).

One registry per app, so two servers in one process (tests) count apart. Latency buckets
are in seconds and span what a CPU server sees: a token every 10 ms alone, every few
hundred ms in a full batch; a first token in well under a second, or many seconds queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no `*_created` twin per series: the start time is not news

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float], slots_busy: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmft_requests",
            "Finished requests by route and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("llmft_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.cached_tokens = Counter(
            "llmft_prompt_tokens_cached",
            "Prompt tokens found in a slot's KV cache (serve.cache_prompt), not decoded again.",
            registry=r,
        )
        self.generated_tokens = Counter("llmft_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "llmft_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llmft_inter_token_latency_seconds",
            "Between two consecutive tokens of one request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        Gauge("llmft_queue_depth", "Admitted requests not yet in a slot.", registry=r).set_function(
            queue_depth
        )
        Gauge("llmft_slots_busy", "Sequence slots generating now.", registry=r).set_function(
            slots_busy
        )

    def token(self, job: Any) -> None:
        """Called by the decode thread for each generated token of `job`."""
        now = time.perf_counter()
        if job.last_token_at is None:
            self.ttft.observe(now - job.arrived)
        else:
            self.itl.observe(now - job.last_token_at)
        job.last_token_at = now
        self.generated_tokens.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
