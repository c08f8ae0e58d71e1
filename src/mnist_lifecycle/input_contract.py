"""The input contract of /predict (and /invocations, V2 infer): request bodies -> grey levels.

`{"image": ...}`: one 28x28 image as nested lists, one flat list of 784 values, or a batch of
either, grey levels 0-255 (0-1 floats are NOT rescaled: they are read as near-black pixels; the
guardrails flag them). Every malformed body raises InputError naming the culprit, which the
request guard answers as a 4xx JSON error.
"""

from __future__ import annotations

import numpy as np
import orjson

from .data import IMAGE_SIZE
from .request_guard import InputError
PIXELS = IMAGE_SIZE * IMAGE_SIZE
MAX_BATCH = 1024  # images per request


def _invalid(message: str) -> InputError:
    return InputError(422, "INVALID_INPUT", message)


def _describe(value) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"a string ({value[:20]!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return repr(value)


def _find_malformed(value, path: str = "image", depth: int = 0) -> str | None:
    """Where a nested list is not a rectangular array of numbers: the first culprit, or None.

    Only called once numpy has refused the input (or let booleans through as integers), to turn
    "inhomogeneous shape" into a message naming the element.
    """
    if not isinstance(value, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        return f"{path} is {_describe(value)}, expected a number from 0 to 255"
    if depth == 3:  # batch, rows, columns: deeper is wrong, and must not exhaust the stack
        return f"{path} is {_describe(value)}, expected a number: images nest at most 3 lists deep"
    if not value:
        return f"{path} is an empty list"
    first_is_list = isinstance(value[0], list)
    for index, item in enumerate(value):
        if isinstance(item, list) != first_is_list or (
            first_is_list and len(item) != len(value[0])
        ):
            return (f"{path}[{index}] is {_describe(item)} but {path}[0] is {_describe(value[0])}: "
                    "rows must all be lists of the same length, or all numbers")
        problem = _find_malformed(item, f"{path}[{index}]", depth + 1)
        if problem:
            return problem
    return None


def _load_json(body: bytes):
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InputError(400, "INVALID_JSON", f"body is not valid JSON: {exc}") from None


def _single_key(payload, keys: tuple[str, ...], what: str) -> str:
    """The one key of a request object among `keys`, else a 422 naming what was sent."""
    expected = " or ".join(f'{{"{key}": ...}}' for key in keys)
    names = " or ".join(f'"{key}"' for key in keys)
    if not isinstance(payload, dict):
        raise _invalid(f"body must be a JSON object {expected}, got {_describe(payload)}")
    present = [key for key in keys if key in payload]
    if not present:
        raise _invalid(f"body must have the key {names} ({what}), got keys {sorted(payload)}")
    if len(payload) > 1:
        raise _invalid(f"unexpected key(s) {sorted(set(payload) - {present[0]})}: only {names} is accepted")
    return present[0]


def _grey_levels(image, body: bytes, name: str, batch_only: bool = False) -> tuple[np.ndarray, bool]:
    """Nested lists -> (float32 N x 28 x 28, whether they were a batch); 422 naming the culprit.

    `batch_only`: only N x 28 x 28, the model's signature (what MLflow's /invocations feeds it).
    """
    if not isinstance(image, list):
        raise _invalid(f"{name} must be a list (nested lists of grey levels), got {_describe(image)}")
    try:
        array = np.array(image)
    except (ValueError, OverflowError):
        array = None
    # numpy reads [1, true] as integers: booleans can only appear in the body as JSON literals,
    # since the one key holds the images and strings would have made the array a string array.
    if array is None or array.dtype.kind not in "iuf" or b"true" in body or b"false" in body:
        raise _invalid(_find_malformed(image, name) or f"{name} must be nested lists of numbers")

    single = not batch_only and (array.ndim == 1 and array.shape[0] == PIXELS
                                 or array.shape == (IMAGE_SIZE, IMAGE_SIZE))
    batched = (array.ndim == 3 and array.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE)
               or not batch_only and array.ndim == 2 and array.shape[1] == PIXELS)
    if not (single or batched):
        if array.size == 0:
            raise _invalid(_find_malformed(image, name) or f"{name} is empty")
        expected = (f"a batch of images, N x {IMAGE_SIZE} x {IMAGE_SIZE}" if batch_only else
                    f"one image ({IMAGE_SIZE} x {IMAGE_SIZE} nested lists, or a flat list of {PIXELS}) "
                    f"or a batch of either (N x {IMAGE_SIZE} x {IMAGE_SIZE} or N x {PIXELS})")
        raise _invalid(f"{name} has shape {' x '.join(map(str, array.shape))}; expected {expected}")
    if batched and len(array) > MAX_BATCH:
        raise _invalid(f"batch of {len(array)} images exceeds the maximum of {MAX_BATCH} per request")

    check_range(array, name)
    return array.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32), batched


def check_range(array: np.ndarray, name: str) -> None:
    """422 naming the first value that is not a grey level 0-255."""
    outside = ~np.isfinite(array) | (array < 0) | (array > 255)
    if outside.any():
        first = np.argwhere(outside)[0]
        where = "".join(f"[{i}]" for i in first)
        raise _invalid(f"{name}{where} = {array[tuple(first)]} is outside 0-255: "
                       "send grey levels 0-255 (0-1 values are not rescaled)")


def parse_images(body: bytes) -> tuple[np.ndarray, bool]:
    """A /predict body -> (float32 N x 28 x 28 grey levels, whether the request was a batch).

    Raises InputError (400 for invalid JSON, 422 for JSON that breaks the contract).
    """
    payload = _load_json(body)
    key = _single_key(payload, ("image",), "grey levels 0-255 of one 28x28 image or a batch")
    return _grey_levels(payload[key], body, key)


def check_invocation(body: bytes) -> None:
    """An /invocations body holds what /predict accepts, in MLflow's tensor form: {"inputs": N x
    28 x 28} (or "instances"); MLflow's other input forms (dataframes, CSV) are refused."""
    payload = _load_json(body)
    key = _single_key(payload, ("inputs", "instances"), f"a batch of N x {IMAGE_SIZE} x {IMAGE_SIZE} "
                      "grey levels 0-255; dataframe forms are not accepted")
    _grey_levels(payload[key], body, key, batch_only=True)


def encode_prediction(probabilities: np.ndarray, batched: bool, warnings: list[list[dict]]) -> bytes:
    """N x 10 probabilities and each image's guardrail warnings -> the /predict response body."""
    digits = probabilities.argmax(axis=1)
    if batched:
        result = {"digits": digits, "probabilities": probabilities, "warnings": warnings}
    else:
        result = {"digit": int(digits[0]), "probabilities": probabilities[0], "warnings": warnings[0]}
    return orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
