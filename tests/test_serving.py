"""The model server, run for real on loopback: /predict on real MNIST test images, bad input,
MLflow's own `mlflow models serve` on the same registered model, and the Docker image's entrypoint
serving an exported model directory.

The served model is a small one trained here on real MNIST and registered as
`models:/mnist-digits@champion` in a throwaway tracking store, like the pipeline's champion."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import requests
import torch
import yaml
from mlflow.tracking import MlflowClient

from mnist_lifecycle import data, guardrails, model, registry, serving, training

from .conftest import ROOT, VENV_BIN, isolated_env, smoke_params
from .servers import Server, free_port

TEST_IMAGES = 1200


@contextmanager
def running(command: list[str], port: int, env: dict[str, str], cwd: Path, log: Path):
    """A server process, yielded once /ping answers (bounded wait); stopped afterwards."""
    server = Server(command, env, log, f"http://127.0.0.1:{port}", "/ping", cwd=cwd)
    try:
        server.wait_ready()
        yield server.process
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mnist(mnist_source):
    """(train images, train labels, test images, test labels) read from the real idx files."""
    return tuple(data.read_idx(mnist_source / f"{idx.name}.gz").copy() for idx in data.IDX_FILES)


@pytest.fixture(scope="module")
def champion(tmp_path_factory, mnist):
    """A tracking store whose mnist-digits@champion is a small model trained on real MNIST.

    Yields (tracking URI, in-process probabilities of that logged model on the test images).
    """
    train_images, train_labels, test_images, test_labels = mnist
    store = tmp_path_factory.mktemp("tracking")
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    images, labels = (torch.from_numpy(a[:4000]) for a in (train_images, train_labels))
    training.seed_everything(0)
    classifier = model.DigitClassifier(width=8)
    training.train(classifier, images, labels, images[:500], labels[:500], smoke_params(seed=0), progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mlflow.set_experiment("serving-test")  # artifacts beside the database, in the temp dir
        with mlflow.start_run():
            info = model.log_classifier(model.ProbabilityModel(classifier.eval()), train_images[:5])
        # Scored as the evaluate notebook scores it: the logged model, loaded back.
        logged = mlflow.pytorch.load_model(info.model_uri)
        probabilities = model.predict_probabilities(logged, torch.from_numpy(test_images[:TEST_IMAGES])).numpy()
        accuracy = float((probabilities.argmax(1) == test_labels[:TEST_IMAGES]).mean())
        version = mlflow.register_model(info.model_uri, "mnist-digits").version
        MlflowClient().set_registered_model_alias("mnist-digits", registry.CHAMPION, version)
    mlflow.set_tracking_uri(None)
    assert accuracy > 0.85  # 4,000 images, one epoch: a real classifier, far above chance
    return tracking_uri, probabilities


SERVER_LOGS = {}  # process id -> log file of the module's server
BODY_TIMEOUT = 3  # seconds, short so that the stalled-client test is quick


def server_log(process) -> Path:
    return SERVER_LOGS[process.pid]


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """`python -m mnist_lifecycle.serving` with its default model URI, on a free port."""
    tracking_uri, _ = champion
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "mnist_lifecycle.serving", "--port", str(port)]
    env = isolated_env(MLFLOW_TRACKING_URI=tracking_uri, MNIST_SERVING_BODY_TIMEOUT=str(BODY_TIMEOUT))
    with running(command, port, env, ROOT, log) as process:
        SERVER_LOGS[process.pid] = log
        yield f"http://127.0.0.1:{port}", process


def predict(session: requests.Session, url: str, image) -> dict:
    response = session.post(f"{url}/predict", json={"image": image})
    assert response.status_code == 200, response.text
    return response.json()


def test_predict_answers_real_test_images_as_the_model_does_in_process(server, champion, mnist):
    url, _ = server
    _, probabilities = champion
    test_images, test_labels = mnist[2][:TEST_IMAGES], mnist[3][:TEST_IMAGES]
    with requests.Session() as session:  # keep-alive, like a real client
        answers = [predict(session, url, image.tolist()) for image in test_images]
        # The same images again as batches, flat and 28x28.
        flat = predict(session, url, test_images[:600].reshape(600, -1).tolist())
        square = predict(session, url, test_images[600:].tolist())
    digits = np.array([answer["digit"] for answer in answers])
    assert np.array_equal(digits, probabilities.argmax(1))
    assert np.allclose([answer["probabilities"] for answer in answers], probabilities, atol=1e-5)
    assert flat["digits"] + square["digits"] == digits.tolist()
    assert np.allclose(flat["probabilities"] + square["probabilities"], probabilities, atol=1e-5)
    served_accuracy = float((digits == test_labels).mean())
    assert served_accuracy == float((probabilities.argmax(1) == test_labels).mean()) > 0.85


def test_predict_accepts_every_documented_form_of_one_image(server, champion, mnist):
    url, _ = server
    image = mnist[2][0]
    with requests.Session() as session:
        forms = [image.tolist(), image.reshape(-1).tolist(), image.astype(float).tolist()]
        answers = [predict(session, url, form) for form in forms]
    assert {answer["digit"] for answer in answers} == {int(champion[1][0].argmax())}
    assert all(len(answer["probabilities"]) == 10 and abs(sum(answer["probabilities"]) - 1) < 1e-4
               for answer in answers)


def test_server_keeps_mlflow_routes_and_publishes_the_contract(server, champion, mnist):
    url, _ = server
    assert requests.get(f"{url}/ping").status_code == 200
    assert requests.get(f"{url}/health").status_code == 200
    assert requests.get(f"{url}/version").text == mlflow.__version__
    invocation = requests.post(f"{url}/invocations", json={"inputs": mnist[2][:3].astype(float).tolist()})
    assert invocation.status_code == 200, invocation.text
    assert np.array(invocation.json()["predictions"]).shape == (3, 10)

    spec = requests.get(f"{url}/openapi.json").json()
    assert {"/predict", "/invocations", "/ping", "/health", "/version"} <= set(spec["paths"])
    operation = spec["paths"]["/predict"]["post"]
    body = operation["requestBody"]["content"]["application/json"]
    assert body["schema"]["required"] == ["image"]
    assert len(body["schema"]["properties"]["image"]["oneOf"]) == 4
    assert "0-255" in body["schema"]["properties"]["image"]["description"]
    assert {"200", "400", "413", "415", "422"} <= set(operation["responses"])
    # The published example is a real digit (MNIST's first test image, a 7) and a valid request.
    assert body["example"]["image"] == mnist[2][0].tolist() and mnist[3][0] == 7
    example = requests.post(f"{url}/predict", json=body["example"])
    assert example.status_code == 200 and example.json()["digit"] == int(champion[1][0].argmax())
    invocations_example = spec["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]
    assert requests.post(f"{url}/invocations", json=invocations_example["example"]).status_code == 200
    for route in serving.TEXT_ROUTES:
        assert list(spec["paths"][route]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert spec["info"]["title"] == "MNIST digit classifier"
    # /docs works offline: Swagger UI's files come from this server.
    docs = requests.get(f"{url}/docs").text
    assets = re.findall(r'(?:href|src)="([^"]+)"', docs)
    assert assets and all(asset.startswith("/docs/assets/") for asset in assets), assets
    assert all(requests.get(f"{url}{asset}").status_code == 200 for asset in assets)


def rows(value: float, height: int = 28, width: int = 28) -> list:
    return [[value] * width for _ in range(height)]


def bad_requests() -> list[tuple[str, bytes, str, int, str]]:
    """(what, body, content type, expected status, words the message must contain)."""
    ok = rows(0)
    def body(image) -> bytes:
        return json.dumps({"image": image}).encode()

    def replace(image, row: int, col: int, value):
        copy = [list(r) for r in image]
        copy[row][col] = value
        return copy

    json_type = "application/json"
    cases = [
        ("truncated JSON", b'{"image": [[0, 0]', json_type, 400, "not valid JSON"),
        ("not JSON", b"image=0", json_type, 400, "not valid JSON"),
        ("empty body", b"", json_type, 400, "not valid JSON"),
        ("NaN literal", b'{"image": [NaN]}', json_type, 400, "not valid JSON"),
        ("Infinity literal", b'{"image": [Infinity]}', json_type, 400, "not valid JSON"),
        ("number overflowing to inf", b'{"image": [1e999]}', json_type, 400, "infinity"),
        ("trailing comma", b'{"image": [1, 2,]}', json_type, 400, "not valid JSON"),
        ("invalid UTF-8", b'{"image": "\xff"}', json_type, 400, "not valid JSON"),
        ("two documents", b'{"image": []} {"image": []}', json_type, 400, "not valid JSON"),
        ("a list, not an object", json.dumps(ok).encode(), json_type, 422, "JSON object"),
        ("a number", b"7", json_type, 422, "JSON object"),
        ("a string", b'"image"', json_type, 422, "JSON object"),
        ("null", b"null", json_type, 422, "JSON object"),
        ("empty object", b"{}", json_type, 422, 'key "image"'),
        ("misspelled key", json.dumps({"images": ok}).encode(), json_type, 422, "['images']"),
        ("extra key", json.dumps({"image": ok, "threshold": 0.5}).encode(), json_type, 422, "threshold"),
        ("image is a string", body("0" * 784), json_type, 422, "a string"),
        ("image is a number", body(5), json_type, 422, "got 5"),
        ("image is null", body(None), json_type, 422, "got null"),
        ("image is an object", body({"pixels": ok}), json_type, 422, "an object"),
        ("image is a boolean", body(True), json_type, 422, "a boolean"),
        ("empty list", body([]), json_type, 422, "empty"),
        ("list of an empty list", body([[]]), json_type, 422, "empty"),
        ("batch of empty images", body([[], []]), json_type, 422, "empty"),
        ("27 x 28", body(rows(0, 27)), json_type, 422, "shape 27 x 28"),
        ("28 x 27", body(rows(0, 28, 27)), json_type, 422, "shape 28 x 27"),
        ("29 x 28", body(rows(0, 29)), json_type, 422, "shape 29 x 28"),
        ("flat 783", body([0] * 783), json_type, 422, "shape 783"),
        ("flat 785", body([0] * 785), json_type, 422, "shape 785"),
        ("batch of 27 x 28", body([rows(0, 27)] * 2), json_type, 422, "shape 2 x 27 x 28"),
        ("28 x 28 x 1 (channel last)", body([[[0]] * 28] * 28), json_type, 422, "shape 28 x 28 x 1"),
        ("4-D batch", body([[rows(0)]]), json_type, 422, "shape 1 x 1 x 28 x 28"),
        ("a single pixel", body([0]), json_type, 422, "shape 1"),
        ("batch of flat 783", body([[0] * 783] * 3), json_type, 422, "shape 3 x 783"),
        ("ragged rows", body(rows(0)[:27] + [[0] * 27]), json_type, 422, "image[27] is a list of 27"),
        ("ragged batch", body([rows(0), rows(0, 27)]), json_type, 422, "image[1] is a list of 27"),
        ("number among rows", body(rows(0)[:27] + [0]), json_type, 422, "image[27] is 0"),
        ("nested 900 lists deep", b'{"image": ' + b"[" * 900 + b"0" + b"]" * 900 + b"}", json_type, 422,
         "image[0][0][0] is a list of 1, expected a number"),
        ("nested beyond the parser's limit", b'{"image": ' + b"[" * 5000 + b"]" * 5000 + b"}", json_type,
         400, "depth limit"),
        ("string pixel", body(replace(ok, 3, 4, "12")), json_type, 422, "image[3][4] is a string"),
        ("word pixel", body(replace(ok, 0, 0, "white")), json_type, 422, "image[0][0] is a string"),
        ("null pixel", body(replace(ok, 5, 6, None)), json_type, 422, "image[5][6] is null"),
        ("true pixel", body(replace(ok, 7, 8, True)), json_type, 422, "image[7][8] is a boolean"),
        ("false pixel", body(replace(ok, 9, 1, False)), json_type, 422, "image[9][1] is a boolean"),
        ("object pixel", body(replace(ok, 2, 2, {"v": 1})), json_type, 422, "image[2][2] is an object"),
        ("list pixel", body(replace(ok, 2, 3, [1])), json_type, 422, "image[2][3] is a list of 1"),
        ("all booleans", body([[True] * 28] * 28), json_type, 422, "image[0][0] is a boolean"),
        ("negative pixel", body(replace(ok, 1, 2, -1)), json_type, 422, "image[1][2] = -1 is outside 0-255"),
        ("256", body(replace(ok, 4, 4, 256)), json_type, 422, "image[4][4] = 256 is outside 0-255"),
        ("255.5", body(replace(ok, 4, 5, 255.5)), json_type, 422, "outside 0-255"),
        ("-0.001", body(replace(ok, 4, 6, -0.001)), json_type, 422, "outside 0-255"),
        ("1e300", body(replace(ok, 0, 1, 1e300)), json_type, 422, "outside 0-255"),
        ("huge integer", body(replace(ok, 0, 2, 10**30)), json_type, 422, "outside 0-255"),
        ("out of range in a flat batch", body([[0] * 784, [0] * 783 + [300]]), json_type, 422,
         "image[1][783] = 300"),
        (f"batch of {serving.MAX_BATCH + 1}", json.dumps({"image": [[0] * 784] * (serving.MAX_BATCH + 1)}).encode(),
         json_type, 422, f"maximum of {serving.MAX_BATCH}"),
        ("text/plain", body(ok), "text/plain", 415, "application/json"),
        ("form encoded", body(ok), "application/x-www-form-urlencoded", 415, "application/json"),
        ("no content type", body(ok), "", 415, "no Content-Type"),
        ("multipart", body(ok), "multipart/form-data; boundary=x", 415, "application/json"),
        ("json-like type", body(ok), "application/jsonl", 415, "application/json"),
    ]
    return cases


def test_bad_requests_get_clear_4xx_json_errors_and_the_server_keeps_serving(server, mnist):
    url, process = server
    cases = bad_requests()
    assert len(cases) >= 50
    failures = post_each(f"{url}/predict", cases)
    with requests.Session() as session:
        # Not /predict's contract at all: still a 4xx JSON answer.
        wrong_method = session.get(f"{url}/predict")
        assert wrong_method.status_code == 405 and wrong_method.json()
        assert predict(session, url, mnist[2][0].tolist())["digit"] in range(10)
    assert not failures, "\n".join(failures)
    assert process.poll() is None


def invocation_requests() -> list[tuple[str, bytes, str, int, str]]:
    """/predict's bad requests with its key renamed to MLflow's "inputs" (same status; the message
    may differ, e.g. a single image is refused for its shape there), and the requests that broke
    MLflow's own handler."""
    json_type = "application/json"
    single = [rows(0)]
    renamed = []
    for what, body, content_type, status, words in bad_requests():
        if body.startswith(b'{"image": '):
            body = b'{"inputs": ' + body[len(b'{"image": '):]
        words = ""
        renamed.append((what, body, content_type, status, words))
    ok = json.dumps({"inputs": single}).encode()
    return [
        *renamed,
        ("64 MiB body", b'{"inputs": [' + b"0," * (32 * 2**20) + b"0]}", json_type, 413, "exceeds the limit"),
        ("nested 1000 lists deep", b'{"inputs": ' + b"[" * 1000 + b"0" + b"]" * 1000 + b"}", json_type, 422,
         "inputs[0][0][0] is a list of 1, expected a number"),
        ("no content type (MLflow: 500)", ok, "", 415, "no Content-Type"),
        ("1e308 (MLflow: NaN probabilities)", json.dumps({"inputs": [[[1e308] * 28] * 28]}).encode(),
         json_type, 422, "inputs[0][0][0] = 1e+308 is outside 0-255"),
        ("256", json.dumps({"inputs": [rows(256)]}).encode(), json_type, 422, "= 256 is outside 0-255"),
        ("booleans", json.dumps({"inputs": [[[True] * 28] * 28]}).encode(), json_type, 422, "is a boolean"),
        ("one image, not a batch", json.dumps({"inputs": rows(0)}).encode(), json_type, 422,
         "inputs has shape 28 x 28; expected a batch of images, N x 28 x 28"),
        ("flat batch", json.dumps({"inputs": [[0] * 784]}).encode(), json_type, 422, "shape 1 x 784"),
        ("dataframe_split", json.dumps({"dataframe_split": {"columns": ["a"], "data": [[1]]}}).encode(),
         json_type, 422, "dataframe forms are not accepted"),
        ("inputs and params", json.dumps({"inputs": single, "params": {"x": 1}}).encode(), json_type, 422,
         "unexpected key(s) ['params']"),
        ("instances and inputs", json.dumps({"inputs": single, "instances": single}).encode(), json_type, 422,
         "unexpected key(s)"),
        ("CSV", b"a,b\n1,2\n", "text/csv", 415, "application/json"),
        ("latin-1 charset", ok, "application/json; charset=latin-1", 415, "charset utf-8"),
        ("unknown content-type parameter", ok, "application/json; format=pandas-split", 415, "charset utf-8"),
    ]


def post_each(url: str, cases) -> list[str]:
    """POST each (what, body, content type, status, words) on one connection: the mismatches."""
    failures = []
    with requests.Session() as session:
        for what, body, content_type, status, words in cases:
            headers = {"Content-Type": content_type} if content_type else {}
            response = session.post(url, data=body, headers=headers)
            try:
                error = response.json()
            except ValueError:
                error = {}
            if (response.status_code != status or set(error) != {"error_code", "message"}
                    or words not in error["message"] or len(error["message"]) < 20):
                failures.append(f"{what}: {response.status_code} {response.text[:300]}")
    return failures


def test_invocations_gets_the_same_policy_and_answers_valid_batches_as_before(server, champion, mnist):
    url, process = server
    cases = invocation_requests()
    assert len(cases) >= 50
    failures = post_each(f"{url}/invocations", cases)
    assert not failures, "\n".join(failures)
    for key in ("inputs", "instances"):
        answer = requests.post(f"{url}/invocations", json={key: mnist[2][:5].tolist()})
        assert answer.status_code == 200, answer.text
        assert np.allclose(answer.json()["predictions"], champion[1][:5], atol=1e-5)
    assert process.poll() is None


@pytest.mark.parametrize("route", [*serving.TEXT_ROUTES, "/openapi.json", "/docs", "/model"])
def test_get_routes_ignore_bodies_refuse_other_methods_and_answer_what_they_say(server, route):
    url, process = server
    first = requests.get(f"{url}{route}")
    media_type = {"/openapi.json": "application/json", "/docs": "text/html", "/model": "application/json"}.get(route, "text/plain")
    assert first.status_code == 200 and first.headers["content-type"].startswith(media_type)
    if route in serving.TEXT_ROUTES:
        assert first.text == (mlflow.__version__ if route == "/version" else "\n")
    bodies = [(what, body, content_type) for what, body, content_type, _, _ in bad_requests()]
    cases = [*bodies, ("64 MiB body", b"0" * (64 * 2**20), "text/plain")]
    assert len(cases) >= 50
    failures = []
    with requests.Session() as session:
        for what, body, content_type in cases:
            response = session.get(f"{url}{route}", data=body, headers={"Content-Type": content_type})
            wanted = 413 if len(body) > serving.MAX_BODY_BYTES else 200
            if response.status_code != wanted or wanted == 200 and (
                    response.text != first.text or response.headers["content-type"] != first.headers["content-type"]):
                failures.append(f"{what}: {response.status_code} {response.headers.get('content-type')} "
                                f"{response.text[:200]!r}")
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            response = session.request(method, f"{url}{route}", data=b"{}")
            if response.status_code != 405 or "detail" not in response.json():
                failures.append(f"{method}: {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    assert process.poll() is None


def test_stalled_and_vanishing_clients_are_dropped_with_one_log_line(server):
    """A body that stops arriving is answered 408 and its connection closed after the body
    timeout; a client that leaves mid-body is one log line, never a traceback."""
    url, process = server
    port = int(url.rsplit(":", 1)[1])
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
        stalled.sendall(head + b'{"image": [')
        answer = b""
        while chunk := stalled.recv(65536):  # ends when the server closes the connection
            answer += chunk
    waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"did not arrive within" in answer
    assert BODY_TIMEOUT <= waited < BODY_TIMEOUT + 10

    log = Path(server_log(process))
    before = log.read_text()
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as leaving:
            leaving.sendall(head + b'{"image": [0, 0')
    deadline = time.monotonic() + 30
    while log.read_text().count("went away") - before.count("went away") < 50 and time.monotonic() < deadline:
        time.sleep(0.2)
    added = log.read_text()[len(before):]
    assert added.count("went away") == 50, added[-3000:]
    assert "Traceback" not in added and len(added.splitlines()) == 50
    assert requests.get(f"{url}/ping").status_code == 200 and process.poll() is None


def test_bodies_above_the_size_limit_are_refused_with_413(server, mnist):
    url, process = server
    # Announced by Content-Length, and sent chunked (no length known until read).
    too_large = b'{"image": [' + b"0," * (serving.MAX_BODY_BYTES // 2) + b"0]}"
    announced = requests.post(f"{url}/predict", data=too_large, headers={"Content-Type": "application/json"})
    chunked = requests.post(f"{url}/predict", data=iter([too_large[i : i + 2**20] for i in range(0, len(too_large), 2**20)]),
                            headers={"Content-Type": "application/json"})
    for response in (announced, chunked):
        assert response.status_code == 413, response.text[:300]
        assert f"limit of {serving.MAX_BODY_BYTES} bytes" in response.json()["message"]
    assert process.poll() is None
    assert requests.post(f"{url}/predict", json={"image": mnist[2][1].tolist()}).status_code == 200


def test_mlflow_models_serve_serves_the_same_registered_model(champion, mnist, tmp_path):
    """MLflow's own server, unchanged, on models:/mnist-digits@champion: /invocations works."""
    tracking_uri, probabilities = champion
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/mnist-digits@champion",
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    images = mnist[2][:200].astype(np.float32)
    with running(command, port, isolated_env(MLFLOW_TRACKING_URI=tracking_uri), tmp_path, tmp_path / "log"):
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": images.tolist()})
        assert response.status_code == 200, response.text[:2000]
        served = np.array(response.json()["predictions"])
        assert np.array_equal(served.argmax(1), probabilities[:200].argmax(1))
        assert np.allclose(served, probabilities[:200], atol=1e-5)
        assert requests.get(f"http://127.0.0.1:{port}/health").status_code == 200


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    logical = re.sub(r"\\\n", " ", text)
    return [tuple(line.strip().split(None, 1)) for line in logical.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_docker_entrypoint_serves_the_exported_model_directory(champion, mnist, tmp_path):
    """What serving/Dockerfile runs, run here: its ENTRYPOINT with its ENV, on a model directory
    exported like `make export-model` does (the image COPYs that directory)."""
    tracking_uri, probabilities = champion
    instructions = dockerfile_instructions((ROOT / "serving" / "Dockerfile").read_text())
    env_values = {}
    for keyword, argument in instructions:
        if keyword == "ENV":
            env_values.update(pair.split("=", 1) for pair in argument.split())
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    copies = [argument.split() for keyword, argument in instructions if keyword == "COPY"]
    assert ["serving/model", env_values["MODEL_URI"]] in copies
    assert env_values["MNIST_SERVING_PORT"] == "9201" and "EXPOSE" in dict(instructions)
    assert dict(instructions)["EXPOSE"] == env_values["MNIST_SERVING_PORT"]

    # The export step of the Makefile, with the same command.
    makefile = (ROOT / "Makefile").read_text()
    assert "mlflow artifacts download --artifact-uri $(MODEL_URI) --dst-path $(MODEL_DIR)" in makefile
    model_dir = tmp_path / "model"
    subprocess.run([str(VENV_BIN / "mlflow"), "artifacts", "download", "--artifact-uri",
                    "models:/mnist-digits@champion", "--dst-path", str(model_dir)],
                   env=isolated_env(MLFLOW_TRACKING_URI=tracking_uri), check=True, capture_output=True)
    assert (model_dir / "MLmodel").is_file()

    port = free_port()
    # The image's environment, except: the exported directory where the image has /opt/model,
    # and loopback on a free port where the container binds 0.0.0.0:9201. No tracking store.
    env = isolated_env(**{**env_values, "MODEL_URI": str(model_dir), "MNIST_SERVING_HOST": "127.0.0.1",
                       "MNIST_SERVING_PORT": str(port), "HOME": str(tmp_path)})
    command = [sys.executable if entrypoint[0] == "python" else entrypoint[0], *entrypoint[1:]]
    workdir = tmp_path / "workdir"  # like the image's WORKDIR: no project around it
    workdir.mkdir()
    with running(command, port, env, workdir, tmp_path / "log"):
        with requests.Session() as session:
            answers = [predict(session, f"http://127.0.0.1:{port}", image.tolist()) for image in mnist[2][:100]]
            assert requests.get(f"http://127.0.0.1:{port}/health").status_code == 200
    assert [answer["digit"] for answer in answers] == probabilities[:100].argmax(1).tolist()


def test_serving_requirements_agree_with_the_lock_and_leave_torch_to_the_dockerfile():
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]
              if "version" in p}
    text = (ROOT / "serving" / "requirements.txt").read_text()
    pinned = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", text, re.M))
    assert {"mlflow", "fastapi", "uvicorn", "orjson", "numpy"} <= set(pinned)
    assert {name: version for name, version in pinned.items() if locked.get(name) != version} == {}
    assert not [name for name in pinned if name == "torch" or name.startswith(("nvidia", "cuda", "triton"))]
    dockerfile = (ROOT / "serving" / "Dockerfile").read_text()
    assert f"torch=={locked['torch']}+cpu" in dockerfile


KUBERNETES_VERSION = "1.33.0"  # any cluster since 1.30 runs these (the preStop sleep action)


def test_kubernetes_manifests_are_valid_roll_and_probe_routes_the_server_has(server):
    """Every manifest against Kubernetes' own schemas (kubernetes-validate, offline, strict: unknown
    fields refused), and what makes the Deployment roll without dropping requests."""
    import kubernetes_validate

    manifests = {}
    for path in sorted((ROOT / "serving" / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
            manifests[document["kind"]] = document
    assert set(manifests) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    deployment, service = manifests["Deployment"], manifests["Service"]
    hpa, pdb = manifests["HorizontalPodAutoscaler"], manifests["PodDisruptionBudget"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["replicas"] >= 2 and hpa["spec"]["minReplicas"] >= 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == serving.DEFAULT_PORT
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
    assert service["spec"]["type"] == "ClusterIP"  # no authentication: never exposed directly
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"] == labels == pdb["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}

    # The probes and the scrape annotation name routes this server answers.
    url, _ = server
    probes = [container[probe]["httpGet"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    paths = [probe["path"] for probe in probes] + [annotations["prometheus.io/path"]]
    assert all(probe["port"] == port["name"] for probe in probes)
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    assert {path: requests.get(f"{url}{path}").status_code for path in paths} == dict.fromkeys(paths, 200)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_parse_images_shapes_and_dtype():
    image = np.arange(784).reshape(28, 28) % 256
    for form, batched in ((image.tolist(), False), (image.reshape(-1).tolist(), False),
                          ([image.tolist()] * 3, True), ([image.reshape(-1).tolist()] * 2, True)):
        pixels, is_batch = serving.parse_images(json.dumps({"image": form}).encode())
        assert is_batch == batched and pixels.dtype == np.float32 and pixels.shape[1:] == (28, 28)
        assert np.array_equal(pixels[0], image)
    # 0-1 floats are grey levels like any other: not rescaled.
    pixels, _ = serving.parse_images(json.dumps({"image": [0.5] * 784}).encode())
    assert pixels.max() == 0.5


def test_a_request_is_counted_before_its_last_bytes_reach_the_client():
    """A client that holds its answer and then scrapes /metrics finds that request counted, exactly once."""
    import asyncio

    from prometheus_client import REGISTRY

    from mnist_lifecycle import metrics

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    labels = {"route": metrics.route_label("/model"), "method": "GET", "status": "200"}

    def count() -> float:
        return REGISTRY.get_sample_value("mnist_http_requests_total", labels) or 0.0

    before, seen = count(), []

    async def client(message):
        seen.append((message["type"], count() - before))

    asyncio.run(metrics.Instrumented(app)({"type": "http", "path": "/model", "method": "GET"}, None, client))
    assert seen == [("http.response.start", 0), ("http.response.body", 1)]
    assert count() - before == 1


def test_schemathesis_finds_no_server_error_nor_schema_violation(server, tmp_path):
    """Every route of /openapi.json, generated requests valid and invalid (bounded: a fixed seed,
    a few dozen examples per operation), every check schemathesis has."""
    url, process = server
    report = tmp_path / "schemathesis.json"
    result = subprocess.run(
        [str(VENV_BIN / "schemathesis"), "run", f"{url}/openapi.json", "--checks", "all", "--mode", "all",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "60", "--seed", "1", "--workers", "1",
         "--generation-database", "none", "--no-color", "--request-timeout", "30",
         "--report", "json", "--report-json-path", str(report)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert generated and generated[1] == generated[2] and int(generated[1]) >= 250, result.stdout[-3000:]
    # /predict, /invocations, /model, /ping, /health, /version; /metrics (Prometheus text) and /v2 (the
    # Open Inference Protocol's own specification) are left out of the schema, tested above.
    assert "Tested: 6" in result.stdout
    print(generated[0])  # the figure of docs/serving.md
    assert process.poll() is None


# --- Following the registry: hot swap, identity, metrics, the V2 protocol -----------------------

POLL_SECONDS = 1.0


def train_and_register(images, labels, seed: int, tags: dict) -> str:
    """Another small real classifier registered as a new version of mnist-digits (current store)."""
    training.seed_everything(seed)
    classifier = model.DigitClassifier(width=8)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    training.train(classifier, images, labels, images[:500], labels[:500], smoke_params(seed=seed), progress=False)
    with mlflow.start_run():
        info = model.log_classifier(model.ProbabilityModel(classifier.eval()), images[:5].numpy())
    version = mlflow.register_model(info.model_uri, "mnist-digits").version
    for key, value in tags.items():
        MlflowClient().set_model_version_tag("mnist-digits", version, key, value)
    return str(version)


def validation_images(mnist) -> np.ndarray:
    """The prepare stage's validation split (5,000 training images, seed 0), without the 8,000
    images the test models were trained on."""
    _, validation = data.split_train_val(len(mnist[0]), 5000, 0)
    return mnist[0][validation[validation >= 8000]]


@pytest.fixture(scope="module")
def registry_copy(champion, mnist, tmp_path_factory):
    """A copy of the champion's store (artifacts shared) with a second real version registered.

    Yields (tracking URI, store file, in-process probabilities of version 2 on the test images).
    """
    store = tmp_path_factory.mktemp("following") / "mlflow.db"
    store.write_bytes(Path(champion[0].removeprefix("sqlite:///")).read_bytes())
    tracking_uri = f"sqlite:///{store}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mlflow.set_experiment("serving-test")
        MlflowClient().set_model_version_tag("mnist-digits", "1", "test_accuracy", "0.9")
        second = train_and_register(mnist[0][4000:8000], mnist[1][4000:8000], 1, {"test_accuracy": "0.91"})
        assert second == "2"
        logged = mlflow.pyfunc.load_model("models:/mnist-digits/2").get_raw_model()
        with torch.inference_mode():
            probabilities = logged(torch.from_numpy(mnist[2][:TEST_IMAGES].astype(np.float32))).numpy()
            validation = logged(torch.from_numpy(validation_images(mnist).astype(np.float32))).numpy()
        # What `python -m mnist_lifecycle.guardrails --record` records, chosen the same way.
        MlflowClient().set_model_version_tag("mnist-digits", "2", guardrails.MIN_CONFIDENCE_TAG,
                                             str(guardrails.choose_min_confidence(validation)))
    mlflow.set_tracking_uri(None)
    assert not np.array_equal(probabilities.argmax(1), champion[1].argmax(1))  # a different model
    return tracking_uri, store, probabilities


@pytest.fixture(scope="module")
def following_server(registry_copy, tmp_path_factory):
    tracking_uri, _, _ = registry_copy
    port = free_port()
    log = tmp_path_factory.mktemp("following-server") / "server.log"
    command = [sys.executable, "-m", "mnist_lifecycle.serving", "--port", str(port),
               "--poll-seconds", str(POLL_SECONDS)]
    with running(command, port, isolated_env(MLFLOW_TRACKING_URI=tracking_uri), ROOT, log) as process:
        SERVER_LOGS[process.pid] = log
        yield f"http://127.0.0.1:{port}", process


def move_champion(tracking_uri: str, version: str) -> None:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias("mnist-digits", registry.CHAMPION, version)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus-client's own parser: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_champion_moved_while_8_clients_send_requests_is_swapped_in_without_an_error(
        following_server, registry_copy, champion, mnist):
    import threading

    url, process = following_server
    tracking_uri, _, second = registry_copy
    before = requests.get(f"{url}/model").json()
    assert (before["name"], before["version"], before["alias"], before["test_accuracy"]) == (
        "mnist-digits", "1", "champion", 0.9)
    assert before["run_id"] and before["source"] and before["loaded_at"]
    images = mnist[2][:200]
    seen: list[list[tuple[float, int, str | None, int]]] = [[] for _ in range(8)]
    stop = threading.Event()

    def client(index: int) -> None:
        with requests.Session() as session:
            for count in range(3000):  # bounded in count, and stopped by the test
                if stop.is_set():
                    return
                which = (index * 37 + count) % len(images)
                response = session.post(f"{url}/predict", json={"image": images[which].tolist()}, timeout=30)
                digit = response.json().get("digit") if response.status_code == 200 else None
                seen[index].append((time.monotonic(), response.status_code,
                                    response.headers.get("X-Model-Version"), which, digit))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        moved_at = time.monotonic()
        move_champion(tracking_uri, "2")
        deadline = moved_at + 60
        while requests.get(f"{url}/model").json()["version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    after = requests.get(f"{url}/model").json()
    assert after["version"] == "2" and after["test_accuracy"] == 0.91 and after["run_id"] != before["run_id"]

    responses = [answer for answers in seen for answer in answers]
    assert len(responses) > 100 and {status for _, status, *_ in responses} == {200}
    assert {header for _, _, header, *_ in responses} == {"1", "2"}
    # Each answer is the one of the version its header names, and a client never goes back.
    expected = {"1": champion[1].argmax(1), "2": second.argmax(1)}
    assert all(digit == expected[header][which] for _, _, header, which, digit in responses)
    for answers in seen:
        headers = [header for _, _, header, *_ in answers]
        assert headers == sorted(headers), "a client got version 1 after version 2"
    first_new = min(at for at, _, header, *_ in responses if header == "2")
    load = float(re.findall(r"now serving version 2 \(was 1\), loaded in ([\d.]+) s", server_log(process).read_text())[-1])
    assert first_new - moved_at <= POLL_SECONDS + load + 1.0, (first_new - moved_at, load)
    print(f"{len(responses)} answers, all 200; version 2 answered {first_new - moved_at:.2f} s after the move "
          f"(poll {POLL_SECONDS:g} s, load {load:.2f} s)")
    metrics = scrape(url)
    assert metrics[("mnist_model_swaps_total", ())] == 1
    assert metrics[("mnist_served_model_info", (("alias", "champion"), ("name", "mnist-digits"),
                                                ("run_id", after["run_id"]), ("version", "2")))] == 1
    assert process.poll() is None


def test_a_broken_version_or_a_missing_registry_leaves_the_served_model_in_place(following_server, registry_copy, mnist):
    url, process = following_server
    tracking_uri, store, second = registry_copy
    if requests.get(f"{url}/model").json()["version"] != "2":  # run alone: swap to 2 first
        move_champion(tracking_uri, "2")
        time.sleep(POLL_SECONDS * 5)
    serving_now = requests.get(f"{url}/model").json()
    start = scrape(url)
    broken_model = store.parent / "broken"
    broken_model.mkdir()
    (broken_model / "MLmodel").write_text("not: a model\n")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    broken = client.create_model_version("mnist-digits", str(broken_model)).version
    move_champion(tracking_uri, broken)
    deadline = time.monotonic() + 60
    while scrape(url).get(("mnist_model_swap_failures_total", ()), 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scrape(url)[("mnist_model_swap_failures_total", ())] == start[("mnist_model_swap_failures_total", ())] + 1
    assert requests.get(f"{url}/model").json() == serving_now
    assert f"version {broken} of models:/mnist-digits@champion failed to load" in server_log(process).read_text()

    # The store disappears (moved away): polls fail, are counted, and create no empty store.
    hidden = store.with_suffix(".away")
    store.rename(hidden)
    try:
        failures = start[("mnist_registry_poll_failures_total", ())]
        deadline = time.monotonic() + 30
        while scrape(url)[("mnist_registry_poll_failures_total", ())] < failures + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scrape(url)[("mnist_registry_poll_failures_total", ())] >= failures + 2
        assert not store.exists()
        answer = requests.post(f"{url}/predict", json={"image": mnist[2][3].tolist()})
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "2"
        assert answer.json()["digit"] == int(second[3].argmax())
    finally:
        hidden.rename(store)
    move_champion(tracking_uri, "2")
    assert requests.get(f"{url}/model").json()["version"] == "2" and process.poll() is None


def test_metrics_parse_and_count_exactly_the_requests_sent(server, champion, mnist):
    url, process = server
    before = scrape(url)
    images = mnist[2][:40]
    with requests.Session() as session:
        singles = [session.post(f"{url}/predict", json={"image": image.tolist()}) for image in images[:30]]
        batch = session.post(f"{url}/predict", json={"image": images[30:].tolist()})
        bad = [session.post(f"{url}/predict", json={"image": rows(256)}) for _ in range(7)]
        invocations = [session.post(f"{url}/invocations", json={"inputs": images[:2].tolist()}) for _ in range(3)]
    assert {r.status_code for r in [*singles, batch, *invocations]} == {200} and {r.status_code for r in bad} == {422}
    after = scrape(url)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("mnist_http_requests_total", route="/predict", method="POST", status="200") == 31
    assert delta("mnist_http_requests_total", route="/predict", method="POST", status="422") == 7
    assert delta("mnist_http_requests_total", route="/invocations", method="POST", status="200") == 3
    assert delta("mnist_http_requests_total", route="/metrics", method="GET", status="200") == 1  # the first scrape
    assert delta("mnist_http_request_duration_seconds_count", route="/predict") == 38
    assert delta("mnist_images_per_request_count") == 31 and delta("mnist_images_per_request_sum") == 40
    assert delta("mnist_images_per_request_bucket", le="1.0") == 30
    digits = champion[1][:40].argmax(1)
    for digit in range(10):
        assert delta("mnist_predicted_digits_total", digit=str(digit)) == (digits == digit).sum()
    assert delta("mnist_prediction_confidence_count") == 40
    confident = (champion[1][:40].max(1) <= 0.9).sum()
    assert delta("mnist_prediction_confidence_bucket", le="0.9") == confident
    served = [key for key, value in after.items() if key[0] == "mnist_served_model_info" and value == 1]
    assert served == [("mnist_served_model_info", (("alias", "champion"), ("name", "mnist-digits"),
                                                   ("run_id", requests.get(f"{url}/model").json()["run_id"]),
                                                   ("version", "1")))]
    assert after[("mnist_model_swaps_total", ())] == 0 and after[("mnist_registry_poll_failures_total", ())] == 0
    assert process.poll() is None


def v2_bad_requests() -> list[tuple[str, bytes, str, str, int, str]]:
    """(what, path, body, content type, expected status, words the message must contain) for V2."""
    infer = "/v2/models/mnist-digits/infer"
    json_type = "application/json"

    def tensor(**changes) -> bytes:
        base = {"name": "image", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}
        base.update(changes)
        for key in [key for key, value in base.items() if value is ...]:
            del base[key]
        return json.dumps({"inputs": [base]}).encode()

    cases = [
        ("not JSON", infer, b"{", json_type, 400, "not valid JSON"),
        ("empty body", infer, b"", json_type, 400, "not valid JSON"),
        ("NaN literal", infer, b'{"inputs": [NaN]}', json_type, 400, "not valid JSON"),
        ("a list", infer, b"[]", json_type, 400, "JSON object"),
        ("a number", infer, b"7", json_type, 400, "JSON object"),
        ("missing inputs", infer, b"{}", json_type, 400, 'no "inputs"'),
        ("missing inputs, other keys", infer, b'{"id": "1"}', json_type, 400, 'no "inputs"'),
        ("inputs null", infer, b'{"inputs": null}', json_type, 400, "exactly one tensor"),
        ("inputs empty", infer, b'{"inputs": []}', json_type, 400, "exactly one tensor"),
        ("two inputs", infer, json.dumps({"inputs": [json.loads(tensor())["inputs"][0]] * 2}).encode(),
         json_type, 400, "exactly one tensor"),
        ("input not an object", infer, b'{"inputs": [1]}', json_type, 400, "exactly one tensor"),
        ("unknown request key", infer, b'{"inputs": [], "extra": 1}', json_type, 400, "unknown key"),
        ("id not a string", infer, tensor()[:-1] + b', "id": 5}', json_type, 400, "id must be a string"),
        ("no datatype", infer, tensor(datatype=...), json_type, 400, "lacks ['datatype']"),
        ("no shape", infer, tensor(shape=...), json_type, 400, "lacks ['shape']"),
        ("no data", infer, tensor(data=...), json_type, 400, "lacks ['data']"),
        ("no name", infer, tensor(name=...), json_type, 400, "lacks ['name']"),
        ("unknown tensor key", infer, tensor(extra=1), json_type, 400, "unknown key"),
        ("unknown outputs", infer, tensor()[:-1] + b', "outputs": [{"name": "logits"}]}', json_type, 400, "outputs"),
        ("outputs not a list", infer, tensor()[:-1] + b', "outputs": 3}', json_type, 400, "outputs"),
        ("binary data extension", infer, tensor(data=None), json_type, 400, "data must be a list"),
        ("data a string", infer, tensor(data="AAAA"), json_type, 400, "data must be a list"),
        ("data an object", infer, tensor(data={"a": 1}), json_type, 400, "data must be a list"),
        ("booleans", infer, tensor(data=[True] * 784), json_type, 400, "booleans"),
        ("nulls", infer, tensor(data=[None] * 784), json_type, 400, "nulls"),
        ("strings", infer, tensor(data=["0"] * 784), json_type, 400, "only numbers"),
        ("ragged nested data", infer, tensor(data=[[0] * 784, [0] * 783], shape=[2, 784]), json_type, 400, "rectangular"),
        ("huge number", infer, tensor(data=[10**400] + [0] * 783), json_type, 400, ""),
        ("negative", infer, tensor(data=[-1] + [0] * 783), json_type, 400, "outside 0-255"),
        ("256", infer, tensor(data=[256] + [0] * 783), json_type, 400, "outside 0-255"),
        ("1e308 float", infer, tensor(datatype="FP32", data=[1e308] + [0] * 783), json_type, 400, "outside 0-255"),
        ("UINT8 with a fraction", infer, tensor(data=[0.5] + [0] * 783), json_type, 400, "whole numbers"),
        ("too few values", infer, tensor(data=[0] * 783), json_type, 400, "holds 784 values but data has 783"),
        ("too many values", infer, tensor(data=[0] * 785), json_type, 400, "holds 784 values but data has 785"),
        ("nested, one row short", infer, tensor(shape=[1, 28, 28], data=[[0] * 28] * 27), json_type, 400, "holds 784"),
        ("two images announced, one sent", infer, tensor(shape=[2, 784]), json_type, 400, "holds 1568"),
        ("shape 27x28", infer, tensor(shape=[1, 27, 28], data=[0] * 756), json_type, 400, "is not [N, 28, 28]"),
        ("shape 1-d", infer, tensor(shape=[784]), json_type, 400, "is not [N, 28, 28]"),
        ("shape 4-d", infer, tensor(shape=[1, 1, 28, 28]), json_type, 400, "is not [N, 28, 28]"),
        ("shape of strings", infer, tensor(shape=["1", "784"]), json_type, 400, "is not [N, 28, 28]"),
        ("shape negative", infer, tensor(shape=[-1, 784]), json_type, 400, "is not [N, 28, 28]"),
        ("shape of floats", infer, tensor(shape=[1.0, 784]), json_type, 400, "is not [N, 28, 28]"),
        ("shape null", infer, tensor(shape=None), json_type, 400, "is not [N, 28, 28]"),
        ("zero images", infer, tensor(shape=[0, 784], data=[]), json_type, 400, "1 to 1024"),
        ("1025 images", infer, tensor(shape=[1025, 784], data=[0] * (1025 * 784)), json_type, 400, "1 to 1024"),
        ("datatype FP64", infer, tensor(datatype="FP64"), json_type, 400, "FP32 or UINT8"),
        ("datatype INT32", infer, tensor(datatype="INT32"), json_type, 400, "FP32 or UINT8"),
        ("datatype BYTES", infer, tensor(datatype="BYTES"), json_type, 400, "FP32 or UINT8"),
        ("datatype lower case", infer, tensor(datatype="fp32"), json_type, 400, "FP32 or UINT8"),
        ("datatype null", infer, tensor(datatype=None), json_type, 400, "FP32 or UINT8"),
        ("unknown model", "/v2/models/resnet/infer", tensor(), json_type, 404, "'resnet' is not served"),
        ("unknown version", "/v2/models/mnist-digits/versions/99/infer", tensor(), json_type, 404,
         "version '99' of 'mnist-digits' is not served"),
        ("unknown model metadata", "/v2/models/resnet", b"", json_type, 404, "is not served"),
        ("unknown model ready", "/v2/models/resnet/ready", b"", json_type, 404, "is not served"),
        ("GET infer", infer, b"", json_type, 405, "use POST"),
        ("POST health", "/v2/health/ready", b"{}", json_type, 405, "use GET"),
        ("no content type", infer, tensor(), "", 415, "no Content-Type"),
        ("text/plain", infer, tensor(), "text/plain", 415, "application/json"),
        ("oversized", infer, b'{"inputs": [{"data": [' + b"0," * (serving.MAX_BODY_BYTES // 2) + b"0]}]}",
         json_type, 413, "exceeds the limit"),
    ]
    return cases


def test_v2_malformed_requests_get_protocol_errors_and_the_server_keeps_serving(server, mnist):
    url, process = server
    cases = v2_bad_requests()
    assert len(cases) >= 50
    failures = []
    with requests.Session() as session:
        for what, path, body, content_type, status, words in cases:
            method = "GET" if what.startswith("GET") or path.endswith(("resnet", "ready")) and "POST" not in what else "POST"
            headers = {"Content-Type": content_type} if content_type else {}
            response = session.request(method, f"{url}{path}", data=body, headers=headers)
            try:
                error = response.json()
            except ValueError:
                error = {}
            if (response.status_code != status or set(error) != {"error"} or words not in error["error"]
                    or len(error["error"]) < 15):
                failures.append(f"{what}: {response.status_code} {response.text[:300]}")
        good = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8", "data": mnist[2][0].tolist()}]}
        assert session.post(f"{url}/v2/models/mnist-digits/infer", json=good).status_code == 200
    assert not failures, "\n".join(failures)
    assert process.poll() is None


def test_v2_answers_1000_real_test_images_as_predict_does(server, mnist):
    url, process = server
    images = mnist[2][:1000]
    with requests.Session() as session:
        assert session.get(f"{url}/v2/health/live").json() == {"live": True}
        assert session.get(f"{url}/v2/health/ready").json() == {"ready": True}
        identity = session.get(f"{url}/model").json()
        metadata = session.get(f"{url}/v2/models/mnist-digits").json()
        assert metadata["name"] == "mnist-digits" and metadata["versions"] == [identity["version"]]
        assert session.get(f"{url}/v2/models/mnist-digits/versions/{identity['version']}/ready").json()["ready"]
        predicted = session.post(f"{url}/predict", json={"image": images.tolist()})
        digits, probabilities = [], []
        # Every accepted form: UINT8 and FP32, [N, 28, 28] and [N, 784], flat and nested data.
        forms = [("UINT8", (28, 28), True), ("FP32", (784,), False), ("FP32", (28, 28), True), ("UINT8", (784,), False)]
        for start in range(0, 1000, 100):
            datatype, shape, nested = forms[start // 100 % 4]
            batch = images[start:start + 100].astype(np.uint8 if datatype == "UINT8" else np.float32)
            data = batch.reshape(100, *shape).tolist() if nested else batch.reshape(-1).tolist()
            path = (f"/v2/models/mnist-digits/versions/{identity['version']}/infer" if start % 200
                    else "/v2/models/mnist-digits/infer")
            response = session.post(f"{url}{path}", json={"id": f"batch-{start}", "inputs": [
                {"name": "image", "shape": [100, *shape], "datatype": datatype, "data": data}]})
            assert response.status_code == 200, response.text[:500]
            answer = response.json()
            assert answer["id"] == f"batch-{start}" and answer["model_name"] == "mnist-digits"
            assert answer["model_version"] == identity["version"] == response.headers["X-Model-Version"]
            outputs = {output["name"]: output for output in answer["outputs"]}
            assert outputs["probabilities"]["shape"] == [100, 10] and outputs["digit"]["shape"] == [100]
            assert outputs["probabilities"]["datatype"] == "FP32" and outputs["digit"]["datatype"] == "INT64"
            digits += outputs["digit"]["data"]
            probabilities += outputs["probabilities"]["data"]
        only_digit = session.post(f"{url}/v2/models/mnist-digits/infer", json={"outputs": [{"name": "digit"}], "inputs": [
            {"name": "image", "shape": [1, 784], "datatype": "UINT8", "data": images[0].reshape(-1).tolist()}]}).json()
    assert predicted.status_code == 200
    assert digits == predicted.json()["digits"]
    assert np.array_equal(np.array(probabilities).reshape(1000, 10), np.array(predicted.json()["probabilities"]))
    assert [output["name"] for output in only_digit["outputs"]] == ["digit"]
    assert only_digit["outputs"][0]["data"] == digits[:1]
    assert process.poll() is None


def test_metrics_add_up_across_worker_processes(champion, mnist, tmp_path):
    """--workers 2: prometheus-client's multi-process mode, /metrics sums both workers' counts."""
    tracking_uri, probabilities = champion
    port = free_port()
    command = [sys.executable, "-m", "mnist_lifecycle.serving", "--port", str(port), "--workers", "2"]
    url = f"http://127.0.0.1:{port}"
    values = tmp_path / "metrics"  # where the workers write their values (main() makes one if unset)
    values.mkdir()
    env = isolated_env(MLFLOW_TRACKING_URI=tracking_uri, PROMETHEUS_MULTIPROC_DIR=str(values))
    with running(command, port, env, ROOT, tmp_path / "log"):
        from concurrent.futures import ThreadPoolExecutor

        from prometheus_client.multiprocess import MultiProcessCollector

        def per_worker() -> list[float]:
            """Each process's own /predict count, from its own file (the supervisor has one too)."""
            counts = []
            for path in sorted(values.glob("counter_*.db")):
                samples = [sample for metric in MultiProcessCollector.merge([str(path)]) for sample in metric.samples
                           if sample.name == "mnist_http_requests_total" and sample.labels.get("route") == "/predict"]
                counts.append(sum(sample.value for sample in samples))
            return counts

        def predict(index: int) -> int:  # a new connection each: the kernel hands it to either worker
            return requests.post(f"{url}/predict", json={"image": mnist[2][index].tolist()},
                                 headers={"Connection": "close"}, timeout=30).json()["digit"]

        before = scrape(url)
        sent = []
        # Which worker accepts a connection is the kernel's choice; concurrent batches, until both
        # have answered some (bounded: 400 requests).
        with ThreadPoolExecutor(max_workers=8) as pool:
            while len(sent) < 400 and (len(sent) < 40 or len([c for c in per_worker() if c > 0]) < 2):
                batch = list(range(len(sent), len(sent) + 8))
                sent += list(zip(batch, pool.map(predict, batch)))
        after = scrape(url)
        counts = per_worker()
    key = ("mnist_http_requests_total", (("method", "POST"), ("route", "/predict"), ("status", "200")))
    assert len([count for count in counts if count > 0]) == 2, counts
    assert after[key] - before.get(key, 0) == len(sent) == sum(counts)
    assert after[("mnist_images_per_request_count", ())] - before.get(("mnist_images_per_request_count", ()), 0) == len(sent)
    assert [digit for _, digit in sent] == probabilities[:len(sent)].argmax(1).tolist()


def test_guardrails_flag_no_real_mnist_image_and_every_blank_inverted_or_scaled_one(mnist, champion):
    """The input checks on all 70,000 MNIST images, and the low-confidence threshold chosen on the
    validation split for the test champion: together <= 0.5% of the 10,000 clean test images."""
    every_image = np.concatenate([mnist[0], mnist[2]]).astype(np.float32)
    assert sum(map(bool, guardrails.input_flags(every_image))) == 0
    test = mnist[2].astype(np.float32)
    for code, images in (("inverted", 255 - test), ("scaled_0_1", test / 255), ("blank", np.zeros_like(test[:100])),
                         ("blank", np.full_like(test[:100], 255)), ("blank", test / 255 * 20)):
        assert {tuple(codes) for codes in guardrails.input_flags(images)} == {(code,)}

    tracking_uri, _ = champion
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        logged = mlflow.pyfunc.load_model("models:/mnist-digits@champion").get_raw_model()
    with torch.inference_mode():
        validation = logged(torch.from_numpy(validation_images(mnist).astype(np.float32))).numpy()
        on_test = logged(torch.from_numpy(test)).numpy()
    threshold = guardrails.choose_min_confidence(validation)
    flagged = [codes for codes in guardrails.warnings(test, on_test, threshold) if codes]
    rate = len(flagged) / len(test)
    print(f"min_confidence {threshold:.4f} (validation); {len(flagged)} of {len(test)} clean test images "
          f"flagged ({rate:.2%})")
    assert 0 < rate <= 0.005
    assert all([warning["code"] for warning in codes] == ["low_confidence"] for codes in flagged)


def test_answers_carry_the_guardrails_warnings(server, following_server, registry_copy, mnist):
    url, process = server
    image = mnist[2][0].astype(float)
    cases = {(): image, ("blank",): np.zeros((28, 28)), ("inverted",): 255 - image, ("scaled_0_1",): image / 255}
    with requests.Session() as session:
        for codes, pixels in cases.items():
            answer = predict(session, url, pixels.tolist())
            assert tuple(warning["code"] for warning in answer["warnings"]) == codes, answer["warnings"]
            assert all(len(warning["message"]) > 30 for warning in answer["warnings"])
        batch = predict(session, url, np.stack(list(cases.values())).tolist())
        assert [tuple(w["code"] for w in found) for found in batch["warnings"]] == list(cases)
        v2 = session.post(f"{url}/v2/models/mnist-digits/infer", json={"inputs": [
            {"name": "image", "shape": [4, 28, 28], "datatype": "FP32", "data": np.stack(list(cases.values())).tolist()}]})
        assert v2.json()["parameters"]["warnings"] == batch["warnings"]
        before = scrape(url)
        predict(session, url, np.zeros((3, 784)).tolist())
        key = ("mnist_input_warnings_total", (("code", "blank"),))
        assert scrape(url)[key] - before.get(key, 0) == 3

    # Version 2 records its min_confidence: answers below it say so, exactly those.
    url, _ = following_server
    tracking_uri, _, second = registry_copy
    if requests.get(f"{url}/model").json()["version"] != "2":
        move_champion(tracking_uri, "2")
        deadline = time.monotonic() + 30
        while requests.get(f"{url}/model").json()["version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.2)
    threshold = requests.get(f"{url}/model").json()["min_confidence"]
    assert 0.1 < threshold < 1
    answer = predict(requests.Session(), url, mnist[2][:1000].tolist())
    low = [index for index, found in enumerate(answer["warnings"]) if found]
    assert low == np.flatnonzero(second[:1000].max(1) < threshold).tolist() and low
    assert {w["code"] for i in low for w in answer["warnings"][i]} == {"low_confidence"}
    assert process.poll() is None
