"""The served model, and the loop that keeps it on the registry's alias (hot swap).

A server started on `models:/NAME@ALIAS` asks the registry every `poll_seconds` which version the
alias points at. A new version is loaded in the poll thread, answers one warm-up prediction, gets
its own MLflow app (whose /invocations is bound to the model it was built with), and replaces
the current one by a single reference assignment: a request reads `source.current` once and
finishes on that model, so requests in flight during a swap keep the model they started with. A
version that fails to load, or a registry that does not answer, is logged and counted in
/metrics; the model in place keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from . import metrics
from .guardrails import MIN_CONFIDENCE_TAG

LOG = logging.getLogger("uvicorn.error")
DEFAULT_POLL_SECONDS = 5.0
MODEL_VERSION_HEADER = "X-Model-Version"  # on every answer of /predict and V2 infer
TEST_ACCURACY_TAG = "test_accuracy"  # set on each version by the register stage (registry.py)


@dataclass
class ServedModel:
    """One loaded model: its torch module, the ASGI app built for it, and what GET /model says."""

    module: object
    app: object
    identity: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.identity.get("version") or "")

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(pixels)).numpy()


def parse_alias_uri(model_uri: str) -> tuple[str, str] | None:
    """models:/NAME@ALIAS -> (NAME, ALIAS); None for any other URI (those are never polled)."""
    if not model_uri.startswith("models:/"):
        return None
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    return (name, alias) if alias and "/" not in name else None


def _number(tags: dict, key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


class ModelSource:
    """`current` is the ServedModel answering requests; `start()` begins following the alias.

    `build(pyfunc_model)` makes the ASGI app that serves a loaded model (serving.build_app);
    `warm_up` is an image (float32 1 x 28 x 28) each new model must answer before it serves.
    """

    def __init__(self, model_uri: str, build: Callable, warm_up: np.ndarray, poll_seconds: float):
        self.model_uri = model_uri
        self.build = build
        self.warm_up = warm_up
        self.poll_seconds = poll_seconds
        self.alias = parse_alias_uri(model_uri)
        self.failed_version: str | None = None  # not retried until the alias moves elsewhere
        self._stop = threading.Event()
        if self.alias:
            self.current = self._load_version(self._alias_target())
        else:
            self.current = self._load(model_uri, {"source": model_uri})
        metrics.served(self.current.identity, None)

    async def asgi(self, scope, receive, send):
        """The current model's app: what the request guard forwards MLflow's routes to."""
        await self.current.app(scope, receive, send)

    def _alias_target(self):
        from mlflow.tracking import MlflowClient

        name, alias = self.alias
        return MlflowClient().get_model_version_by_alias(name, alias)

    def _load_version(self, version) -> ServedModel:
        name, alias = self.alias
        identity = {"name": name, "version": str(version.version), "alias": alias, "run_id": version.run_id,
                    "model_id": getattr(version, "model_id", None), "source": version.source,
                    "test_accuracy": _number(version.tags, TEST_ACCURACY_TAG),
                    "min_confidence": _number(version.tags, MIN_CONFIDENCE_TAG)}
        # The version, not the alias: the alias may move between resolving it and loading.
        return self._load(f"models:/{name}/{version.version}", identity)

    def _load(self, uri: str, identity: dict) -> ServedModel:
        import mlflow.pyfunc

        pyfunc_model = mlflow.pyfunc.load_model(uri)
        served = ServedModel(pyfunc_model.get_raw_model(), None, identity)
        probabilities = served.forward(self.warm_up)
        if probabilities.shape != (len(self.warm_up), 10) or not np.isfinite(probabilities).all():
            raise ValueError(f"{uri} answered the warm-up image with {probabilities!r}")
        served.app = self.build(pyfunc_model)
        meta = pyfunc_model.metadata
        identity.setdefault("run_id", meta.run_id)
        identity.setdefault("model_id", getattr(meta, "model_id", None))
        identity["loaded_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        return served

    def poll_once(self) -> None:
        """Swap to the alias' target if it moved; never raises (a failure is logged and counted)."""
        import mlflow

        from .lineage import store_missing

        missing = store_missing(mlflow.get_tracking_uri())  # opening it would create an empty store
        try:
            if missing:
                raise FileNotFoundError(f"the tracking store {missing} does not exist")
            target = self._alias_target()
        except Exception as exc:  # noqa: BLE001 - any registry failure: keep serving what we have
            metrics.POLL_FAILURES.inc()
            LOG.warning("registry poll for %s failed, still serving version %s: %s",
                        self.model_uri, self.current.version, exc)
            return
        version = str(target.version)
        if version == self.current.version or version == self.failed_version:
            return
        started = time.monotonic()
        try:
            served = self._load_version(target)
        except Exception as exc:  # noqa: BLE001 - a broken version must not take the server down
            self.failed_version = version
            metrics.SWAP_FAILURES.inc()
            LOG.error("version %s of %s failed to load, still serving version %s: %s",
                      version, self.model_uri, self.current.version, exc)
            return
        previous, self.current = self.current, served
        self.failed_version = None
        metrics.served(served.identity, previous.identity)
        metrics.SWAPS.inc()
        LOG.warning("%s moved: now serving version %s (was %s), loaded in %.2f s",
                    self.model_uri, version, previous.version, time.monotonic() - started)

    def start(self) -> None:
        if self.alias and self.poll_seconds > 0:
            threading.Thread(target=self._follow, name="registry-poll", daemon=True).start()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
