"""Prometheus metrics of the server, named after vLLM's (`vllm:` -> `qnext:`) so dashboards port.

Each server owns its registry (several apps can live in one process, as in the tests). The
engine thread writes them; prometheus_client is thread-safe."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; TTFT on CPU with a cold compile can reach tens of seconds.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        lbl = ["model_name"]
        self.running = Gauge(
            "qnext:num_requests_running", "Requests holding a slot.", lbl, registry=r
        ).labels(model_name)
        self.waiting = Gauge(
            "qnext:num_requests_waiting", "Requests waiting for a slot.", lbl, registry=r
        ).labels(model_name)
        self.free_slots = Gauge(
            "qnext:num_free_slots", "Sequence slots not in use.", lbl, registry=r
        ).labels(model_name)
        self.success = Counter(
            "qnext:request_success",
            "Finished requests by finish reason.",
            lbl + ["finished_reason"],
            registry=r,
        )
        self.http_errors = Counter(
            "qnext:request_errors", "Requests answered with an error.", lbl + ["status"], registry=r
        )
        self.prompt_tokens = Counter(
            "qnext:prompt_tokens", "Prefilled prompt tokens.", lbl, registry=r
        ).labels(model_name)
        self.generation_tokens = Counter(
            "qnext:generation_tokens", "Generated tokens.", lbl, registry=r
        ).labels(model_name)
        self.ttft = Histogram(
            "qnext:time_to_first_token_seconds",
            "Arrival to first token.",
            lbl,
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.itl = Histogram(
            "qnext:inter_token_latency_seconds",
            "Time between output tokens.",
            lbl,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "qnext:e2e_request_latency_seconds",
            "Arrival to finish.",
            lbl,
            buckets=E2E_BUCKETS,
            registry=r,
        ).labels(model_name)
        self.spec_draft = Counter(
            "qnext:spec_decode_num_draft_tokens", "MTP draft tokens.", lbl, registry=r
        ).labels(model_name)
        self.spec_accepted = Counter(
            "qnext:spec_decode_num_accepted_tokens", "Accepted drafts.", lbl, registry=r
        ).labels(model_name)
        self.model_name = model_name

    def finished(self, reason: str) -> None:
        self.success.labels(self.model_name, reason).inc()

    def error(self, status: int) -> None:
        self.http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
