"""Prometheus metrics of the REST API (`GET /metrics`), per ingress replica, in its own registry.

* `lucid_requests_total{http_method, route, method, status}`: requests answered (`method`: the
  interventions of a chat request joined by "+", "none", or the kind of a segment request).
* `lucid_request_latency_seconds{route, method}`: a histogram of time to the response's start.
* `lucid_request_errors_total{route, method, status}`: responses with status >= 400.
* `lucid_rejected_total{route, deployment}`: requests answered 503 because a deployment's queue was full
  (`Api`: the ingress's own `max_inflight_requests`).
* `lucid_inflight_requests`: chat and segment requests this ingress is answering now (queued in Serve
  or on a replica), the depth `max_inflight_requests` bounds.
* `lucid_stopped_total{route, why}`: requests whose work was stopped: `deadline` (a 504) or `disconnect`
  (the client went away).
* `lucid_deployment_limit{deployment, limit}`: the Serve limits declared (`max_ongoing_requests` per
  replica, `max_queued_requests` per caller, -1: none).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lucid_requests",
            "Requests answered",
            ["http_method", "route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lucid_request_latency_seconds",
            "Time to the response's start",
            ["route", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "lucid_request_errors",
            "Responses with status >= 400",
            ["route", "method", "status"],
            registry=self.registry,
        )

        self.rejected = Counter(
            "lucid_rejected",
            "Requests refused with 503 because a deployment's queue was full",
            ["route", "deployment"],
            registry=self.registry,
        )
        self.stopped = Counter(
            "lucid_stopped",
            "Requests whose work was stopped: past their deadline (504) or their client gone",
            ["route", "why"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "lucid_inflight_requests",
            "Chat and segment requests this ingress is answering now (queued or on a replica)",
            registry=self.registry,
        )
        self.limits = Gauge(
            "lucid_deployment_limit",
            "Serve limits per deployment (max_ongoing_requests per replica, max_queued_requests; -1: none)",
            ["deployment", "limit"],
            registry=self.registry,
        )

    def set_limits(self, limits: dict[str, dict[str, int]]) -> None:
        for dep, kv in limits.items():
            for k, v in kv.items():
                self.limits.labels(dep, k).set(v)

    def observe(self, http_method: str, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(http_method, route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)
        if status >= 400:
            self.errors.labels(route, method, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
