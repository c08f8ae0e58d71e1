"""The Open Inference Protocol (V2, as spoken by KServe, Seldon and Triton clients) beside /predict.

    GET  /v2/health/live, /v2/health/ready, /v2
    GET  /v2/models/{name}[/versions/{v}]          model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

One input tensor of datatype FP32 or UINT8 and shape [N, 28, 28] or [N, 784] holding grey levels
0-255 (data flat in row-major order, or nested), checked like /predict's images; the outputs are
`probabilities` (FP32 [N, 10]) and `digit` (INT64 [N]), the same numbers /predict answers.
Errors are the protocol's `{"error": message}` with a 4xx status.
"""

from __future__ import annotations

import math
from importlib.metadata import version

import numpy as np
import orjson

from .data import IMAGE_SIZE, NUM_CLASSES
from .input_contract import MAX_BATCH, PIXELS, _load_json, check_range
from .model_source import MODEL_VERSION_HEADER
from .request_guard import InputError, Reply

DEFAULT_NAME = "mnist-digits"  # the name of a model served from a directory or a run
DATATYPES = ("FP32", "UINT8")
OUTPUTS = ("probabilities", "digit")
REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
TENSOR_KEYS = {"name", "shape", "datatype", "data", "parameters"}


def error_body(error: InputError) -> bytes:
    return orjson.dumps({"error": error.message})


def _bad(message: str) -> InputError:
    return InputError(400, "INVALID_INPUT", message)


def _kind(value) -> str:
    return type(value).__name__ if value is not None else "null"


def parse_tensor(payload) -> tuple[np.ndarray, list[str], str | None]:
    """An infer request -> (float32 N x 28 x 28 grey levels, outputs asked for, request id)."""
    if not isinstance(payload, dict):
        raise _bad(f"body must be a JSON object with \"inputs\", got {_kind(payload)}")
    if "inputs" not in payload:
        raise _bad(f"body has no \"inputs\" (keys: {sorted(payload)})")
    if unknown := set(payload) - REQUEST_KEYS:
        raise _bad(f"unknown key(s) {sorted(unknown)}: a request has {sorted(REQUEST_KEYS)}")
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad("\"inputs\" must be a list of exactly one tensor object {name, shape, datatype, data}")
    tensor = inputs[0]
    if missing := {"name", "shape", "datatype", "data"} - set(tensor):
        raise _bad(f"input tensor lacks {sorted(missing)}")
    if unknown := set(tensor) - TENSOR_KEYS:
        raise _bad(f"input tensor has unknown key(s) {sorted(unknown)}")
    datatype, shape, data = tensor["datatype"], tensor["shape"], tensor["data"]
    if datatype not in DATATYPES:
        raise _bad(f"datatype {datatype!r} is not supported: send FP32 or UINT8 grey levels 0-255")
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
            or not (len(shape) == 3 and shape[1:] == [IMAGE_SIZE, IMAGE_SIZE] or len(shape) == 2 and shape[1] == PIXELS)):
        raise _bad(f"shape {shape!r} is not [N, {IMAGE_SIZE}, {IMAGE_SIZE}] nor [N, {PIXELS}]")
    if not 1 <= shape[0] <= MAX_BATCH:
        raise _bad(f"shape {shape} has {shape[0]} images: send 1 to {MAX_BATCH} per request")
    if not isinstance(data, list):
        raise _bad(f"data must be a list of numbers, got {_kind(data)}")
    if b"true" in (dumped := orjson.dumps(data)) or b"false" in dumped or b"null" in dumped:
        raise _bad("data holds booleans or nulls: send numbers 0-255")
    try:
        array = np.array(data)
    except (ValueError, OverflowError):
        raise _bad("data is not a list of numbers (nested lists must be rectangular)") from None
    if array.dtype.kind not in "iuf":
        raise _bad("data must hold only numbers")
    if array.size != math.prod(shape):
        raise _bad(f"shape {shape} holds {math.prod(shape)} values but data has {array.size}")
    array = array.reshape(shape[0], IMAGE_SIZE, IMAGE_SIZE)
    if datatype == "UINT8" and array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise _bad("UINT8 data must be whole numbers 0-255")
    try:
        check_range(array, "data")
    except InputError as error:
        raise _bad(error.message) from None
    outputs = payload.get("outputs")
    if outputs is None:
        names = list(OUTPUTS)
    elif not isinstance(outputs, list) or not all(isinstance(o, dict) and o.get("name") in OUTPUTS for o in outputs):
        raise _bad(f"outputs must be a list of {{\"name\": ...}} among {list(OUTPUTS)}")
    else:
        names = [o["name"] for o in outputs]
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad(f"id must be a string, got {_kind(request_id)}")
    return array.astype(np.float32), names, request_id


def encode_outputs(probabilities: np.ndarray, names: list[str], model_name: str, model_version: str,
                   request_id: str | None, warnings: list[list[dict]]) -> bytes:
    outputs = {
        "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": list(probabilities.shape),
                          "data": probabilities.reshape(-1)},
        "digit": {"name": "digit", "datatype": "INT64", "shape": [len(probabilities)],
                  "data": probabilities.argmax(axis=1)},
    }
    answer = {"model_name": model_name, "model_version": model_version,
              "outputs": [outputs[name] for name in names],
              # The guardrails' flags, one list per image: the protocol's place for extra information.
              "parameters": {"warnings": warnings}}
    if request_id is not None:
        answer["id"] = request_id
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


class Routes:
    """The V2 routes of one server: `resolve(method, path)` gives the request guard their handler."""

    def __init__(self, source, classify):
        self.source = source
        self.classify = classify  # async (pixels) -> (probabilities, warnings, the ServedModel that answered)

    def _name(self, served) -> str:
        return served.identity.get("name") or DEFAULT_NAME

    def _served(self, name: str, wanted_version: str | None):
        served = self.source.current
        if name != self._name(served):
            raise InputError(404, "NOT_FOUND", f"model {name!r} is not served here; this server serves "
                             f"{self._name(served)!r}")
        if wanted_version is not None and wanted_version != served.version:
            raise InputError(404, "NOT_FOUND", f"version {wanted_version!r} of {name!r} is not served; "
                             f"version {served.version!r} is")
        return served

    def resolve(self, method: str, path: str):
        if not path.startswith("/v2"):
            return None
        parts = path.split("/")[2:]
        if parts in ([], ["health", "live"], ["health", "ready"]):
            return self._only("GET", method, self._server_route(parts))
        if len(parts) < 2 or parts[0] != "models" or not parts[1]:
            return None
        name, rest, wanted = parts[1], parts[2:], None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            wanted, rest = rest[1], rest[2:]
        if rest == []:
            return self._only("GET", method, lambda body: self._metadata(name, wanted))
        if rest == ["ready"]:
            return self._only("GET", method, lambda body: self._ready(name, wanted))
        if rest == ["infer"]:
            return self._only("POST", method, lambda body: self._infer(body, name, wanted))
        return None

    @staticmethod
    def _only(allowed: str, method: str, handler):
        if method == allowed:
            return handler

        async def refuse(body: bytes):
            raise InputError(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed here: use {allowed}")
        return refuse

    def _server_route(self, parts: list[str]):
        async def answer(body: bytes) -> bytes:
            if not parts:
                return orjson.dumps({"name": "mnist-lifecycle", "version": version("mnist-lifecycle"),
                                     "extensions": []})
            # A model is loaded before the server accepts connections, and stays loaded through swaps.
            return orjson.dumps({parts[1]: True})
        return answer

    async def _metadata(self, name: str, wanted: str | None) -> bytes:
        served = self._served(name, wanted)
        return orjson.dumps({
            "name": name, "versions": [served.version] if served.version else [], "platform": "mlflow_pytorch",
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, NUM_CLASSES]},
                        {"name": "digit", "datatype": "INT64", "shape": [-1]}]})

    async def _ready(self, name: str, wanted: str | None) -> bytes:
        self._served(name, wanted)
        return orjson.dumps({"name": name, "ready": True})

    async def _infer(self, body: bytes, name: str, wanted: str | None) -> Reply:
        self._served(name, wanted)
        try:
            pixels, names, request_id = parse_tensor(_load_json(body))
        except InputError as error:
            raise _bad(error.message) from None
        probabilities, found, served = await self.classify(pixels)
        if wanted is not None and served.version != wanted:  # swapped while the body was parsed
            raise InputError(404, "NOT_FOUND", f"version {wanted!r} of {name!r} is no longer served")
        return Reply(encode_outputs(probabilities, names, name, served.version, request_id, found),
                     headers=[(MODEL_VERSION_HEADER.lower().encode(), served.version.encode())])
