"""The model server's Prometheus metrics, served as text at GET /metrics.

With several worker processes (`--workers` > 1) each process writes its values under
$PROMETHEUS_MULTIPROC_DIR (set by serving.main before the workers start, as prometheus-client's
multi-process mode requires) and /metrics aggregates them all, whichever worker answers.
"""

from __future__ import annotations

import os
import time

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter("mnist_http_requests", "HTTP requests answered, by route, method and status",
                   ["route", "method", "status"])
LATENCY = Histogram("mnist_http_request_duration_seconds", "Time from request to the response's end, by route",
                    ["route"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
IMAGES = Histogram("mnist_images_per_request", "Images classified per /predict or V2 infer request",
                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
DIGITS = Counter("mnist_predicted_digits", "Images classified, by predicted digit", ["digit"])
CONFIDENCE = Histogram("mnist_prediction_confidence", "Probability of the predicted digit",
                       buckets=(.2, .3, .4, .5, .6, .7, .8, .9, .95, .99, .999, 1))
SERVED = Gauge("mnist_served_model_info", "1 for the model version served (0 for those served before)",
               ["name", "version", "alias", "run_id"], multiprocess_mode="livemax")
WARNINGS = Counter("mnist_input_warnings", "Guardrail warnings given, by code (docs/serving.md)", ["code"])
SWAPS = Counter("mnist_model_swaps", "Times a new version of the alias was loaded and put in service")
SWAP_FAILURES = Counter("mnist_model_swap_failures", "New versions that failed to load (the old one kept serving)")
POLL_FAILURES = Counter("mnist_registry_poll_failures", "Registry polls that got no answer (model kept in place)")

# Route labels are bounded: V2 paths with a model name are reduced to their template.
KNOWN_ROUTES = frozenset({"/predict", "/invocations", "/model", "/metrics", "/ping", "/health", "/version",
                          "/openapi.json", "/docs", "/v2/health/live", "/v2/health/ready", "/v2"})


def route_label(path: str) -> str:
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/v2/models/"):
        parts = path.split("/")[3:]  # name, [versions, v], [ready | infer]
        template = ["{name}"]
        if parts[1:3] and parts[1] == "versions":
            template += ["versions", "{version}"]
        rest = parts[len(template):]
        return "/v2/models/" + "/".join(template + (rest[:1] if rest[:1] in (["ready"], ["infer"]) else []))
    if path.startswith("/docs/"):
        return "/docs/*"
    return "other"


def _labels(identity: dict) -> dict[str, str]:
    return {key: str(identity.get(key) or "") for key in ("name", "version", "alias", "run_id")}


def served(identity: dict, previous: dict | None) -> None:
    if previous is not None:
        SERVED.labels(**_labels(previous)).set(0)
    SERVED.labels(**_labels(identity)).set(1)


def observe_predictions(probabilities: np.ndarray, warnings: list[list[dict]]) -> None:
    IMAGES.observe(len(probabilities))
    for found in warnings:
        for warning in found:
            WARNINGS.labels(code=warning["code"]).inc()
    for digit, count in zip(*np.unique(probabilities.argmax(axis=1), return_counts=True)):
        DIGITS.labels(digit=str(digit)).inc(int(count))
    for confidence in probabilities.max(axis=1):
        CONFIDENCE.observe(float(confidence))


def render() -> tuple[bytes, str]:
    """The exposition text and its Content-Type."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class Instrumented:
    """ASGI wrapper counting every HTTP request by route and status, and timing it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before answering, uvicorn answers 500
        recorded = False

        def record():
            nonlocal recorded
            if not recorded:
                recorded = True
                route = route_label(scope["path"])
                REQUESTS.labels(route=route, method=scope["method"], status=str(status)).inc()
                LATENCY.labels(route=route).observe(time.perf_counter() - started)

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # before the last bytes leave: a client holding its answer finds it counted
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            record()
