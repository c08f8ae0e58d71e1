"""The model server: MLflow's scoring server with `POST /predict` beside its own routes.

    python -m mnist_lifecycle.serving [--model-uri URI] [--host H] [--port 9201]

MLflow's app (`mlflow.pyfunc.scoring_server.init`) keeps `/invocations`, `/ping`, `/health` and
`/version` exactly as `mlflow models serve` has them; `/predict` is added to that app. It takes
`{"image": ...}`: one 28x28 image as nested lists, one flat list of 784 values, or a batch of
either, grey levels 0-255 (0-1 floats are NOT rescaled: they are read as near-black pixels). It
answers the predicted digit(s), the class probabilities and the guardrails' warnings
(guardrails.py), with the served version in `X-Model-Version`. Preprocessing is inside the logged
model (`model.ProbabilityModel`), so /predict hands it the grey levels as float32, as training
and evaluation did. Every malformed request gets a 4xx JSON error saying what is wrong:
`{"error_code": ..., "message": ...}` (input_contract.py).

Also: GET /model (what is served), GET /metrics (metrics.py), the Open Inference Protocol V2
(inference_v2.py); a server on `models:/NAME@ALIAS` follows the alias (model_source.py).

Every route is behind one input policy (request_guard.py): bodies bounded in size and arrival
time, and `/invocations` validated with /predict's contract (a batch N x 28 x 28 of grey levels
0-255 under "inputs" or "instances") before MLflow's handler sees it. docs/serving.md has the figures.

/predict is built for speed: the raw body parsed by orjson, numpy checks instead of per-request
pydantic models, and the torch module called directly under `torch.inference_mode` instead of
going through `pyfunc.predict` and pandas (see benchmarks/serving.py for the numbers).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from importlib import resources
from importlib.metadata import version
from pathlib import Path

import numpy as np
import orjson
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from . import config, guardrails, metrics
from .data import IMAGE_SIZE, NUM_CLASSES
from .input_contract import (  # noqa: F401 - the contract's names, as serving.* for its users
    MAX_BATCH, PIXELS, _load_json, check_invocation, check_range, encode_prediction, parse_images)
from .model_source import DEFAULT_POLL_SECONDS, MODEL_VERSION_HEADER, ModelSource
from .request_guard import MAX_BODY_BYTES, InputError, Reply, RequestGuard

DEFAULT_MODEL_URI = "models:/mnist-digits@champion"
DEFAULT_PORT = 9201
MODEL_URI_ENV = "MODEL_URI"
HOST_ENV = "MNIST_SERVING_HOST"
PORT_ENV = "MNIST_SERVING_PORT"
WORKERS_ENV = "MNIST_SERVING_WORKERS"
THREADS_ENV = "MNIST_SERVING_THREADS"  # torch intra-op threads per worker process
POLL_ENV = "MNIST_SERVING_POLL_SECONDS"
MIN_CONFIDENCE_ENV = "MNIST_SERVING_MIN_CONFIDENCE"
# From this many images on, the forward pass runs in a worker thread, where torch releases the GIL:
# meanwhile the event loop parses the next request on the other core. A single image's forward
# pass (~1 ms) is cheaper on the event loop than handed to a thread.
THREAD_BATCH = 32


PREDICT_DESCRIPTION = (
    "Predicts the digit in one or more 28x28 grey-level images (0-255, MNIST's polarity: white "
    "ink on black). Preprocessing is the training preprocessing, inside the logged model. "
    "Errors are 4xx JSON objects {error_code, message}."
)


def _pixel_schema() -> dict:
    return {"type": "number", "minimum": 0, "maximum": 255}


def _image_schemas() -> tuple[dict, dict]:
    pixel = _pixel_schema()
    square = {"type": "array", "minItems": IMAGE_SIZE, "maxItems": IMAGE_SIZE,
              "items": {"type": "array", "minItems": IMAGE_SIZE, "maxItems": IMAGE_SIZE, "items": pixel}}
    flat = {"type": "array", "minItems": PIXELS, "maxItems": PIXELS, "items": pixel}
    return square, flat


def openapi_request() -> dict:
    """The /predict request body, as published in the server's OpenAPI schema."""
    square, flat = _image_schemas()
    batch = {"type": "array", "minItems": 1, "maxItems": MAX_BATCH}
    image = {
        "description": (
            f"Grey levels 0-255 (0 = black background, 255 = white ink, as in MNIST), row by row. "
            f"0-1 floats are not rescaled (a warning flags them). One image ({IMAGE_SIZE}x{IMAGE_SIZE} nested "
            f"lists or a flat list of {PIXELS}) or a batch of 1 to {MAX_BATCH} of either. "
            f"Bodies above {MAX_BODY_BYTES} bytes are refused."
        ),
        "oneOf": [
            {"title": "one image, 28x28", **square},
            {"title": "one image, flat", **flat},
            {"title": "batch of 28x28 images", **batch, "items": square},
            {"title": "batch of flat images", **batch, "items": flat},
        ],
    }
    schema = {"type": "object", "required": ["image"], "additionalProperties": False,
              "properties": {"image": image}}
    return {"required": True, "content": {"application/json": {
        "schema": schema, "example": {"image": example_digit()}}}}


def example_digit() -> list[list[int]]:
    """A real handwritten 7 (the first MNIST test image), the example in /docs."""
    return json.loads(resources.files(__package__).joinpath("example_digit.json").read_text())


def openapi_invocations_request() -> dict:
    """The /invocations body the server accepts: MLflow's tensor form of a batch of images."""
    square, _ = _image_schemas()
    batch = {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": square,
             "description": f"a batch of 1 to {MAX_BATCH} images, N x {IMAGE_SIZE} x {IMAGE_SIZE} "
                            "grey levels 0-255"}
    schema = {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
              "properties": {"inputs": batch, "instances": batch}}
    return {"required": True, "content": {"application/json": {
        "schema": schema, "example": {"inputs": [example_digit()]}}}}


def openapi_responses() -> dict:
    probabilities = {"type": "array", "minItems": NUM_CLASSES, "maxItems": NUM_CLASSES,
                     "items": {"type": "number", "minimum": 0, "maximum": 1},
                     "description": "probability of each digit 0-9; they sum to 1"}
    digit = {"type": "integer", "minimum": 0, "maximum": NUM_CLASSES - 1}
    warning = {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"enum": ["blank", "scaled_0_1", "inverted", "low_confidence"]}, "message": {"type": "string"}}}
    warnings = {"type": "array", "items": warning,
                "description": "what makes the image unlike MNIST's (docs/serving.md, Guardrails); empty if nothing"}
    single = {"title": "one image", "type": "object", "required": ["digit", "probabilities", "warnings"],
              "properties": {"digit": digit, "probabilities": probabilities, "warnings": warnings}}
    batch = {"title": "a batch", "type": "object", "required": ["digits", "probabilities", "warnings"],
             "properties": {"digits": {"type": "array", "items": digit},
                            "probabilities": {"type": "array", "items": probabilities},
                            "warnings": {"type": "array", "items": warnings}}}
    return {
        "200": {"description": "the predicted digit(s) and class probabilities",
                "content": {"application/json": {"schema": {"oneOf": [single, batch]}}}},
        **error_responses(),
    }


def error_responses() -> dict:
    """The 4xx answers of the routes with a JSON contract."""
    error = {"content": {"application/json": {"schema": {
        "type": "object", "required": ["error_code", "message"],
        "properties": {"error_code": {"type": "string"}, "message": {"type": "string"}}}}}}
    return {
        "400": {"description": "the body is not valid JSON", **error},
        "408": {"description": "the body did not arrive within the body timeout", **error},
        "413": {"description": f"the body exceeds {MAX_BODY_BYTES} bytes", **error},
        "415": {"description": "Content-Type is not application/json", **error},
        "422": {"description": "valid JSON that breaks the contract: missing or extra key, shape, "
                               f"non-numbers, values outside 0-255, more than {MAX_BATCH} images",
                **error},
    }


def openapi_invocations_responses() -> dict:
    probabilities = {"type": "array", "minItems": NUM_CLASSES, "maxItems": NUM_CLASSES,
                     "items": {"type": "number", "minimum": 0, "maximum": 1}}
    return {
        "200": {"description": "MLflow's answer: the class probabilities of each image",
                "content": {"application/json": {"schema": {
                    "type": "object", "required": ["predictions"],
                    "properties": {"predictions": {"type": "array", "items": probabilities}}}}}},
        **error_responses(),
    }


def resolve_tracking_uri() -> str | None:
    """The pipeline's tracking store: $MLFLOW_TRACKING_URI, else mlflow.db of the project around cwd.

    Outside a project (the Docker image, which serves a local model directory) nothing is set.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    try:
        return config.use_default_tracking_uri(config.project_root())
    except FileNotFoundError:
        return None


def check_registered(model_uri: str) -> None:
    """Before loading a registered model: exit with a message if the tracking store lacks it (no
    traceback, no empty store created); warn if its alias disagrees with the project's
    data/registry/decision.json."""
    from .lineage import StoreMismatch
    from .paths import Layout
    from .registry import check_served

    try:
        decision = Layout.of(config.project_root()).decision
    except FileNotFoundError:
        decision = None  # outside a project: nothing to compare with
    try:
        for warning in check_served(model_uri, decision):
            print(f"warning: {warning}", file=sys.stderr)
    except StoreMismatch as exc:
        sys.exit(f"error: {exc}")


TEXT_ROUTES = ("/ping", "/health", "/version")  # MLflow's: "\n" for the first two, the version


def document_app(app) -> None:
    """Title, the true answers of MLflow's text routes, and /docs on local Swagger UI files."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.title = "MNIST digit classifier"
    app.version = version("mnist-lifecycle")
    app.description = ("POST /predict classifies handwritten digits; MLflow's /invocations takes the "
                       "same images in its tensor form. Every route applies one input policy "
                       "(docs/serving.md).")
    app.router.routes = [route for route in app.router.routes
                         if getattr(route, "path", None) not in ("/docs", "/docs/oauth2-redirect")]
    # The package's files only: importing it would load its web-framework adapters.
    assets = Path(importlib.util.find_spec("swagger_ui").submodule_search_locations[0]) / "static"
    app.mount("/docs/assets", StaticFiles(directory=assets), name="swagger-ui")

    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    # Last: FastAPI regenerates the cached schema when routes change.
    schema = app.openapi()
    text = {"200": {"description": "the text shown", "content": {"text/plain": {"schema": {"type": "string"}}}}}
    for path in TEXT_ROUTES:
        schema["paths"][path]["get"]["responses"] = text


def model_route_responses() -> dict:
    text = {"type": ["string", "null"]}
    identity = {"type": "object", "required": ["source", "loaded_at"], "properties": {
        "name": text, "version": text, "alias": text, "run_id": text, "model_id": text, "source": text,
        "loaded_at": {"type": "string", "description": "when this server loaded it (UTC, ISO 8601)"},
        "test_accuracy": {"type": ["number", "null"], "description": "recorded by the register stage"},
        "min_confidence": {"type": ["number", "null"], "description": "recorded low-confidence threshold"}}}
    return {"200": {"description": "the model this server answers with",
                    "content": {"application/json": {"schema": identity}}}}


def build_app(pyfunc_model, served, predict):
    """MLflow's scoring app for one loaded model (its /invocations is bound to it), with /predict
    and /model added for the OpenAPI schema; the request guard answers those two itself.
    `served()` is the ServedModel answering now."""
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(pyfunc_model)

    async def predict_route(request: Request) -> Response:
        """Only reached when MLflow's app is served without the guard."""
        try:
            reply = await predict(await request.body())
            return Response(reply.body, media_type="application/json", headers={MODEL_VERSION_HEADER: served().version})
        except InputError as error:
            return Response(error.body(), status_code=error.status, media_type="application/json")

    async def model_route() -> Response:
        return Response(orjson.dumps(served().identity), media_type="application/json")

    app.add_api_route(
        "/predict", predict_route, methods=["POST"], summary="Classify handwritten digits", operation_id="predict",
        description=PREDICT_DESCRIPTION, response_class=Response,
        openapi_extra={"requestBody": openapi_request(), "responses": openapi_responses()},
    )
    app.add_api_route("/model", model_route, methods=["GET"], summary="The model served", operation_id="model",
                      response_class=Response, openapi_extra={"responses": model_route_responses()},
                      description="Registered name, version and alias, run and model ids, source, load time "
                                  "and recorded test accuracy of the model answering now.")
    for route in app.routes:
        if getattr(route, "path", None) == "/invocations":
            route.summary = "MLflow's scoring route, validated like /predict"
            route.openapi_extra = {"requestBody": openapi_invocations_request(),
                                   "responses": openapi_invocations_responses()}
    document_app(app)
    return app


def create_app(model_uri: str | None = None, threads: int | None = None,
               poll_seconds: float | None = None, min_confidence: float | None = None) -> metrics.Instrumented:
    """The model (a ModelSource following the registry when the URI is an alias) served by MLflow's
    scoring app with /predict, /model, /metrics and the V2 routes added, behind the input policy of
    request_guard: every request's body bounded in size and time, /predict, /invocations and V2
    infer validated before any model code runs.

    /predict is answered by the guard itself: MLflow's app runs every request through its
    per-request timeout middleware (a Starlette BaseHTTPMiddleware), which costs more than all of
    /predict's own work (benchmarks/serving.py measured about half the throughput through it).
    The route is registered in MLflow's app too, for /openapi.json.

    Arguments default to $MODEL_URI, $MNIST_SERVING_THREADS, $MNIST_SERVING_POLL_SECONDS and
    $MNIST_SERVING_MIN_CONFIDENCE (how uvicorn's worker processes, which call this as a factory, get
    them); without a min_confidence, each version's recorded `min_confidence` tag is used.
    """
    import torch

    from . import inference_v2

    model_uri = model_uri or os.environ.get(MODEL_URI_ENV) or DEFAULT_MODEL_URI
    torch.set_num_threads(threads or int(os.environ.get(THREADS_ENV, "1")))
    if poll_seconds is None:
        poll_seconds = float(os.environ.get(POLL_ENV) or DEFAULT_POLL_SECONDS)
    if min_confidence is None and os.environ.get(MIN_CONFIDENCE_ENV):
        min_confidence = float(os.environ[MIN_CONFIDENCE_ENV])
    resolve_tracking_uri()  # sets $MLFLOW_TRACKING_URI if unset: main() did, a direct caller may not

    async def classify(pixels: np.ndarray):
        """(probabilities, guardrail warnings, the model that answered): one read of
        `source.current` per request."""
        served = source.current
        if len(pixels) < THREAD_BATCH:
            probabilities = served.forward(pixels)
        else:
            probabilities = await run_in_threadpool(served.forward, pixels)
        found = guardrails.warnings(pixels, probabilities, served.identity.get("min_confidence")
                                    if min_confidence is None else min_confidence)
        metrics.observe_predictions(probabilities, found)
        return probabilities, found, served

    async def predict(body: bytes) -> Reply:
        pixels, batched = parse_images(body)
        probabilities, found, served = await classify(pixels)
        return Reply(encode_prediction(probabilities, batched, found),
                     headers=[(MODEL_VERSION_HEADER.lower().encode(), served.version.encode())])

    async def invocations(body: bytes) -> None:
        check_invocation(body)  # then MLflow's handler answers

    async def model(body: bytes) -> bytes:
        return orjson.dumps(source.current.identity)

    async def metrics_text(body: bytes) -> Reply:
        text, content_type = metrics.render()
        return Reply(text, content_type=content_type.encode())

    warm_up = np.array(example_digit(), dtype=np.float32)[None]
    source = ModelSource(model_uri, lambda pyfunc_model: build_app(pyfunc_model, lambda: source.current, predict),
                         warm_up, poll_seconds)
    v2 = inference_v2.Routes(source, classify)
    guard = RequestGuard(source.asgi, {("POST", "/predict"): predict, ("POST", "/invocations"): invocations,
                                       ("GET", "/model"): model, ("GET", "/metrics"): metrics_text},
                         text_routes=TEXT_ROUTES, resolve=v2.resolve, error_forms={"/v2": inference_v2.error_body})
    # Torch, MLflow and the loaded model leave ~600k objects for Python's cyclic collector, which it
    # traverses again and again while a large body is parsed into lists: freezing them more than halves the
    # parse of a 256-image request. Swapped-out models are not frozen; only the first model's cyclic
    # garbage, if it is ever swapped out, stays (once, bounded).
    gc.freeze()
    source.start()
    return metrics.Instrumented(guard)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, each defaulting to an environment variable (how the Docker image sets them)."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m mnist_lifecycle.serving",
        description="Serve a registered digit classifier: POST /predict beside MLflow's routes.")
    parser.add_argument("--model-uri", default=env(MODEL_URI_ENV, DEFAULT_MODEL_URI),
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a local "
                             f"model directory (${MODEL_URI_ENV}; default %(default)s)")
    parser.add_argument("--host", default=env(HOST_ENV, "127.0.0.1"),
                        help=f"address to bind (${HOST_ENV}; default %(default)s). The server has no "
                             "authentication: keep it behind the network boundary")
    parser.add_argument("--port", type=int, default=int(env(PORT_ENV, DEFAULT_PORT)),
                        help=f"(${PORT_ENV}; default %(default)s)")
    parser.add_argument("--workers", type=int, default=int(env(WORKERS_ENV, "1")),
                        help=f"worker processes (${WORKERS_ENV}; default %(default)s)")
    parser.add_argument("--threads", type=int, default=int(env(THREADS_ENV, "1")),
                        help=f"torch threads per worker (${THREADS_ENV}; default %(default)s)")
    parser.add_argument("--poll-seconds", type=float, default=float(env(POLL_ENV, "5")),
                        help="when serving models:/NAME@ALIAS, seconds between asks to the registry where the "
                             f"alias points; a new version is loaded and swapped in (${POLL_ENV}; "
                             "default %(default)s; 0: never)")
    parser.add_argument("--min-confidence", type=float, default=env(MIN_CONFIDENCE_ENV),
                        help="top probability below which an answer carries a low_confidence warning "
                             f"(${MIN_CONFIDENCE_ENV}; default: the served version's tag min_confidence, "
                             "recorded by python -m mnist_lifecycle.guardrails --record; none: not checked)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    # Worker processes build the app from the environment (uvicorn factory).
    os.environ[MODEL_URI_ENV] = args.model_uri
    os.environ[THREADS_ENV] = str(args.threads)
    os.environ[POLL_ENV] = str(args.poll_seconds)
    if args.min_confidence is not None:
        os.environ[MIN_CONFIDENCE_ENV] = str(args.min_confidence)
    metrics_dir = None
    if args.workers > 1 and not os.environ.get(metrics.MULTIPROC_ENV):
        # prometheus-client's multi-process mode: each worker writes its values under this directory.
        metrics_dir = os.environ[metrics.MULTIPROC_ENV] = tempfile.mkdtemp(prefix="mnist-serving-metrics-")
    tracking_uri = resolve_tracking_uri()
    if Path(args.model_uri).exists():
        args.model_uri = str(Path(args.model_uri).resolve())
        os.environ[MODEL_URI_ENV] = args.model_uri
    check_registered(args.model_uri)
    print(f"serving {args.model_uri} (tracking {tracking_uri or 'unset'}) on http://{args.host}:{args.port}",
          file=sys.stderr)
    try:
        uvicorn.run("mnist_lifecycle.serving:create_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="warning")
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
