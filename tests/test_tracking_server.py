"""Tracking servers for real, on loopback: the seed's `mlflow server` (sqlite, client-written
artifacts) and the team deployment's tracking service (deploy/compose.yaml's command and
environment, basic auth, artifacts proxied to S3) on a throwaway PostgreSQL cluster and the
deployment's object store (SeaweedFS, `weed mini`).

Both servers start once for the module (each takes about half a minute to answer /health).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mnist_lifecycle import config, data, lineage

from .conftest import ROOT, VENV_BIN, git, isolated_env, run
from .servers import (ObjectStore, Postgres, Server, free_port, model_server, object_store, postgres_cluster,
                      predict_each)

COMPOSE = ROOT / "deploy" / "compose.yaml"
WRITERS = ROOT / "benchmarks" / "concurrent_writers.py"


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's variable syntax as deploy/compose.yaml uses it: ${VAR}, ${VAR:-default},
    ${VAR:?error}, and $$ for a literal $."""
    def substitute(match: re.Match) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        if variables.get(name):
            return variables[name]
        if operator == ":-":
            return argument
        raise KeyError(f"{name}: {argument or 'unset'}")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, str(value)).replace("$$", "$")


@dataclass
class Servers:
    postgres: Postgres
    seed: Server  # sqlite backend, --default-artifact-root ./artifacts: clients write artifacts themselves
    seed_dir: Path
    team: Server  # PostgreSQL backend, basic auth, artifacts proxied to the object store
    store: ObjectStore
    team_credentials: dict[str, str]  # MLFLOW_TRACKING_USERNAME / _PASSWORD for clients


def seed_server(directory: Path) -> Server:
    """The seed's command (`make server`), in its own directory, on a free port."""
    directory.mkdir()
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", "sqlite:///mlflow.db",
               "--default-artifact-root", "./artifacts", "--host", "127.0.0.1", "--port", str(port)]
    env = {**isolated_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Server(command, env, directory / "server.log", f"http://127.0.0.1:{port}", "/health", cwd=directory)


def compose_object_store(directory: Path):
    """deploy/compose.yaml's `objectstore` service (its command and credentials) on loopback."""
    service = yaml.safe_load(COMPOSE.read_text())["services"]["objectstore"]
    variables = {"S3_SECRET_KEY": secrets.token_hex(16)}
    env = {name: interpolate(value, variables) for name, value in service["environment"].items()}
    assert service["command"][0] == "mini"
    return object_store(directory, [interpolate(a, variables) for a in service["command"][1:]], env)


def team_server(directory: Path, postgres: Postgres, store: ObjectStore) -> tuple[Server, dict[str, str]]:
    """deploy/compose.yaml's `tracking` service: its command and environment, with the test's
    PostgreSQL and object store, loopback and a free port."""
    directory.mkdir()
    admin_password = secrets.token_hex(16)
    variables = {
        "POSTGRES_USER": postgres.user, "POSTGRES_PASSWORD": postgres.password, "POSTGRES_DB": postgres.database,
        "POSTGRES_HOST": postgres.host, "POSTGRES_PORT": str(postgres.port),
        "MLFLOW_S3_ENDPOINT_URL": store.endpoint, "S3_ACCESS_KEY": store.access_key, "S3_SECRET_KEY": store.secret_key,
        "MLFLOW_ADMIN_PASSWORD": admin_password, "MLFLOW_SECRET_KEY": secrets.token_hex(32),
    }
    service = yaml.safe_load(COMPOSE.read_text())["services"]["tracking"]
    env = isolated_env()
    env.update({name: interpolate(value, variables) for name, value in service["environment"].items()})
    # The file compose mounts at that path; the working directory (a volume there) holds basic_auth.db.
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(COMPOSE.parent / mounted[env["MLFLOW_AUTH_CONFIG_PATH"]])
    # The directory of the mounted auth module (basic_auth.ini's authorization_function).
    env["PYTHONPATH"] = str((COMPOSE.parent / mounted[f"{env['PYTHONPATH']}/auth_throttle.py"]).parent)
    command = [interpolate(part, variables) for part in service["command"]]
    port = free_port()
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    command[0] = str(VENV_BIN / command[0])
    server = Server(command, env, directory / "server.log", f"http://127.0.0.1:{port}", "/health", cwd=directory)
    username = env["MLFLOW_AUTH_ADMIN_USERNAME"]
    return server, {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": admin_password}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    base = tmp_path_factory.mktemp("servers")
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(postgres_cluster())
        seed = seed_server(base / "seed")
        stack.callback(seed.stop)
        store = stack.enter_context(compose_object_store(base / "objectstore"))
        team, credentials = team_server(base / "team", postgres, store)
        stack.callback(team.stop)
        seed.wait_ready()  # both start at once: their ~30 s start-ups overlap
        team.wait_ready()
        yield Servers(postgres, seed, base / "seed", team, store, credentials)


def client_env(monkeypatch, tracking_uri: str, credentials: dict[str, str]) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)


def test_team_server_requires_credentials(servers):
    request = urllib.request.Request(f"{servers.team.url}/api/2.0/mlflow/experiments/search?max_results=1")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    # The seed server has no authentication: it must stay on loopback.
    with urllib.request.urlopen(f"{servers.seed.url}/api/2.0/mlflow/experiments/search?max_results=1",
                                timeout=30) as response:
        assert response.status == 200


def test_pipeline_registers_and_serves_through_postgres_server(servers, project, monkeypatch, tmp_path):
    path, env = project
    env = {**env, "MLFLOW_TRACKING_URI": servers.team.url, **servers.team_credentials}
    run(["dvc", "repro"], path, env)
    # Nothing went to the embedded store.
    assert not (path / "mlflow.db").exists() and not (path / "mlartifacts").exists()

    client_env(monkeypatch, servers.team.url, servers.team_credentials)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("mnist-lifecycle")
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # proxied: clients need only HTTP
    runs = {r.data.tags["stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(config.STAGES)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    train_id = runs["train"].info.run_id
    trained = json.loads((path / "data" / "model" / "model.json").read_text())
    assert trained["run_id"] == train_id
    champion = client.get_model_version_by_alias("mnist-digits", "champion")
    assert champion.run_id == train_id
    # The executed notebooks and the model are in the server's artifact destination, the S3 bucket.
    stored = servers.store.keys("mlflow", "artifacts/")
    assert any(name.endswith(f"{train_id}/artifacts/notebook/02_train.ipynb") for name in stored)
    assert any(name.endswith("MLmodel") for name in stored)
    # ... and the metadata in PostgreSQL.
    with servers.postgres.connect() as connection:
        finished = connection.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED' AND experiment_id = %s",
                                      (int(experiment.experiment_id),)).fetchone()[0]
        alias = connection.execute("SELECT version FROM registered_model_aliases WHERE name = 'mnist-digits' "
                                   "AND alias = 'champion'").fetchone()[0]
    assert finished == 4 and str(alias) == champion.version

    # MLflow's own scoring server, loading the champion through the tracking server.
    port = free_port()
    serve = Server([str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/mnist-digits@champion",
                    "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                   env, tmp_path / "serve.log",
                   f"http://127.0.0.1:{port}", "/ping", cwd=tmp_path)
    try:
        serve.wait_ready()
        images, labels = data.load_split(path / "data" / "prepared", "test")
        body = json.dumps({"inputs": images[:32].astype(np.float32).tolist()}).encode()
        request = urllib.request.Request(f"{serve.url}/invocations", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                probabilities = np.array(json.loads(response.read())["predictions"])
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"/invocations answered {exc.code}: {exc.read()[:2000]!r}") from exc
    finally:
        serve.stop()
    assert probabilities.shape == (32, 10)
    evaluated = np.loadtxt(path / "data" / "evaluation" / "predictions.csv", delimiter=",", skiprows=1, dtype=int)
    # Served predictions are the ones the evaluate stage computed for the same images.
    assert probabilities.argmax(axis=1).tolist() == evaluated[:32, 1].tolist()

    # The project's model server, loading the champion through the same server with the read-only
    # account compose gives it.
    reader_password = secrets.token_urlsafe(24)
    reader_account(servers, "model-server-pipeline", reader_password)
    reader_env = {**env, "MLFLOW_TRACKING_USERNAME": "model-server-pipeline", "MLFLOW_TRACKING_PASSWORD": reader_password}
    server = model_server(tmp_path, reader_env, tmp_path / "predict.log")
    try:
        server.wait_ready()
        champion_digits = predict_each(server.url, images[:300])
    finally:
        server.stop()
    assert champion_digits == evaluated[:300, 1].tolist()

    # Either side checks the other: the registered version's files in S3 have the DVC hash that
    # dvc.lock records for data/model/mlflow_model, and the version carries it as a tag.
    locked = {out["path"]: out["md5"] for out in yaml.safe_load((path / "dvc.lock").read_text())["stages"]["train"]["outs"]}
    stored = mlflow.artifacts.download_artifacts(client.get_logged_model(trained["model_id"]).artifact_location,
                                                 dst_path=str(tmp_path / "stored"))
    assert lineage.dvc_md5(Path(stored)) == locked["data/model/mlflow_model"] == champion.tags["model_dvc_md5"]

    # Share: commit, push everything to the team's DVC remote (the object store's other bucket).
    git(path, "add", "-A")
    git(path, "commit", "-qm", "pipeline run")
    s3_env = {**env, **servers.store.env()}
    use_s3_remote(path, servers.store, "s3://dvc/pipeline", s3_env)
    started = time.perf_counter()
    run(["dvc", "push", "--run-cache"], path, s3_env)
    pushed = time.perf_counter() - started
    remote_bytes = sum(o["Size"] for o in servers.store.client().list_objects_v2(Bucket="dvc", Prefix="pipeline/")["Contents"])

    # Reproduce: a second clone with an empty tracking store pulls instead of retraining, and
    # serves the same predictions from the pulled model directory.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(path), str(clone)], check=True)
    clone_env = {**isolated_env(MNIST_SOURCE_DIR=env["MNIST_SOURCE_DIR"]), **servers.store.env()}
    use_s3_remote(clone, servers.store, "s3://dvc/pipeline", clone_env)
    started = time.perf_counter()
    run(["dvc", "pull"], clone, clone_env)
    pulled = time.perf_counter() - started
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, clone_env).stdout
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], clone, clone_env).stdout
    server = model_server(clone, clone_env, tmp_path / "pulled.log", model_uri="data/model/mlflow_model")
    try:
        server.wait_ready()
        ready = time.perf_counter() - started
        assert predict_each(server.url, images[:300]) == champion_digits
    finally:
        server.stop()
    # The clone's own (empty) store was never opened: nothing in it names the model.
    assert not (clone / "mlflow.db").exists()
    print(f"\ndvc push --run-cache {pushed:.1f} s; remote holds {remote_bytes / 2**20:.1f} MiB; "
          f"dvc pull {pulled:.1f} s, pull + server ready {ready:.1f} s")


def use_s3_remote(path: Path, store: ObjectStore, url: str, env: dict[str, str]) -> None:
    """The team's remote, as README "Share and reproduce" sets it: the URL, the endpoint in the
    clone's own config.local (credentials come from the environment)."""
    run(["dvc", "remote", "add", "--local", "-f", "-d", "team", url], path, env)
    run(["dvc", "remote", "modify", "--local", "team", "verify", "true"], path, env)
    run(["dvc", "remote", "modify", "--local", "team", "endpointurl", store.endpoint], path, env)


def test_s3_remote_faults_are_named_and_an_interrupted_push_completes(servers, finished_project, tmp_path):
    path, env = finished_project  # after `dvc repro`
    git(path, "add", "-A")
    git(path, "commit", "-qm", "pipeline")
    s3_env = {**env, **servers.store.env()}
    use_s3_remote(path, servers.store, "s3://dvc/faults", s3_env)
    push = ["python", "-m", "mnist_lifecycle.remote", "push"]

    # A wrong key and an unreachable endpoint: the push fails naming the remote, and sends nothing.
    result = run(push, path, {**s3_env, "AWS_SECRET_ACCESS_KEY": "wrong"}, check=False)
    assert result.returncode != 0 and "Forbidden" in result.stderr
    assert f"dvc push failed for remote 'team' (s3://dvc/faults, endpoint {servers.store.endpoint})" in result.stderr
    run(["dvc", "remote", "modify", "--local", "team", "endpointurl", f"http://127.0.0.1:{free_port()}"], path, s3_env)
    result = run(push, path, s3_env, check=False)
    assert result.returncode != 0 and "Could not connect to the endpoint URL" in result.stderr
    assert servers.store.keys("dvc", "faults/") == []
    run(["dvc", "remote", "modify", "--local", "team", "endpointurl", servers.store.endpoint], path, s3_env)

    # Killed midway (once its first objects are in the bucket), then run again: it completes.
    pushing = subprocess.Popen(push, cwd=path, env=s3_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not servers.store.keys("dvc", "faults/") and pushing.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pushing.poll() is None, "the push ended before it could be interrupted"
    os.killpg(pushing.pid, signal.SIGKILL)
    pushing.wait()
    assert "Cache and remote 'team' are in sync" not in run(["dvc", "status", "-c", "prepare"], path, s3_env).stdout
    run(push, path, s3_env)
    assert "Cache and remote 'team' are in sync" in run(["dvc", "status", "-c", "prepare"], path, s3_env).stdout

    # An object corrupted in the bucket: a clone's pull fails on it and checks nothing bad out.
    labels = path / "data/prepared/val_labels.npy"
    digest = lineage.dvc_md5(labels)
    key = f"faults/files/md5/{digest[:2]}/{digest[2:]}"
    servers.store.client().put_object(Bucket="dvc", Key=key, Body=labels.read_bytes()[:-8] + b"corrupt!")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(path), str(clone)], check=True)
    use_s3_remote(clone, servers.store, "s3://dvc/faults", s3_env)
    result = run(["dvc", "pull", "prepare"], clone, s3_env, check=False)  # dvc.lock names later outputs too
    assert result.returncode != 0 and "data/prepared" in result.stderr
    assert not (clone / "data/prepared/val_labels.npy").exists()


def writers_check(tracking_uri: str, credentials: dict[str, str], tmp_path: Path) -> dict:
    env = {**isolated_env(), "MLFLOW_TRACKING_URI": tracking_uri, **credentials}
    result = subprocess.run([sys.executable, str(WRITERS), "--writers", "8", "--steps", "200",
                             "--root", str(tmp_path)], env=env, capture_output=True, text=True, timeout=400)
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert result.returncode == 0, f"{json.dumps(summary, indent=2)}\n{result.stderr[-3000:]}"
    return summary


def test_eight_concurrent_writers_lose_nothing_on_seed_server(servers, tmp_path):
    summary = writers_check(servers.seed.url, {}, tmp_path)
    assert summary["runs_complete"] == 8 and summary["lost"] == 0 and summary["runs_found"] == 8
    # --default-artifact-root: the clients wrote the artifacts straight into the server's directory.
    assert len(list((servers.seed_dir / "artifacts").rglob("writer.json"))) == 8


def test_eight_concurrent_writers_lose_nothing_on_postgres_server(servers, tmp_path):
    summary = writers_check(servers.team.url, servers.team_credentials, tmp_path)
    assert summary["runs_complete"] == 8 and summary["lost"] == 0 and summary["runs_found"] == 8
    assert len([key for key in servers.store.keys("mlflow", "artifacts/") if key.endswith("writer.json")]) == 8


def test_compose_publishes_only_on_loopback_by_default():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    published = {name: [interpolate(port, {}) for port in service.get("ports", [])]
                 for name, service in services.items()}
    assert published == {"secrets-check": [], "postgres": [], "objectstore": ["127.0.0.1:8333:8333"], "reader-account": [],
                         "tracking": ["127.0.0.1:5000:5000"], "model-server": ["127.0.0.1:9201:9201"]}


def test_tracking_server_image_pins_the_locked_versions():
    pins = dict(re.findall(r"([\w-]+)(?:\[\w+\])?==([\w.]+)", (ROOT / "deploy" / "tracking-server.Dockerfile").read_text()))
    locked = dict(re.findall(r"^([\w-]+)==([\w.]+)", (ROOT / "requirements.lock").read_text(), re.MULTILINE))
    assert set(pins) == {"mlflow", "psycopg", "boto3"}
    assert {name: locked[name] for name in pins} == pins


ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
CHECK_SECRETS = ROOT / "deploy" / "check_secrets.py"


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def service_env(service: dict, variables: dict[str, str]) -> dict[str, str]:
    return {name: interpolate(value, variables) for name, value in service["environment"].items()}


def check_secrets(service: dict, variables: dict[str, str]) -> subprocess.CompletedProcess:
    """The secrets-check service's command, run here with its interpolated environment."""
    command = service["command"]
    assert command[:2] == ["python", "/opt/deploy/check_secrets.py"]
    return subprocess.run([sys.executable, str(CHECK_SECRETS), *command[2:]],
                          env={**isolated_env(), **service_env(service, variables)},
                          capture_output=True, text=True, timeout=60)


def test_deploy_env_is_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT)
    assert ignored.returncode == 0
    assert not subprocess.run(["git", "ls-files", "deploy/.env"], cwd=ROOT, capture_output=True,
                              text=True).stdout


def test_stack_refuses_to_start_on_placeholder_empty_or_short_secrets():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    check = services["secrets-check"]
    names = check["command"][2:]
    # Every secret compose reads is checked: each ${...PASSWORD...:?} or ${...SECRET...:?}.
    required = set(re.findall(r"\$\{(\w*(?:PASSWORD|SECRET)\w*):\?", COMPOSE.read_text()))
    assert set(names) == set(check["environment"]) == required
    # Every other service waits for the check, directly or through what it depends on.
    def waits(name: str) -> bool:
        depends = services[name].get("depends_on", {})
        return "secrets-check" in depends or any(waits(other) for other in depends)
    assert all(waits(name) for name in services if name != "secrets-check")

    example = env_file(ENV_EXAMPLE)
    refused = check_secrets(check, example)
    assert refused.returncode == 1
    for name in names:
        assert f"deploy/.env: {name} still holds the placeholder {example[name]!r}" in refused.stderr

    strong = {**example, **{name: secrets.token_urlsafe(24) for name in names}}
    accepted = check_secrets(check, strong)
    assert accepted.returncode == 0, accepted.stderr
    short = check_secrets(check, {**strong, "MLFLOW_SECRET_KEY": "abc123"})
    assert short.returncode == 1 and "MLFLOW_SECRET_KEY has 6 characters; use at least 16" in short.stderr
    # An empty or unset secret stops compose itself, naming the variable (its ${VAR:?} check) ...
    with pytest.raises(KeyError, match="MLFLOW_READER_PASSWORD: set MLFLOW_READER_PASSWORD in deploy/.env"):
        service_env(check, {**strong, "MLFLOW_READER_PASSWORD": ""})
    # ... and the script as well, should it be run on its own.
    blank = subprocess.run([sys.executable, str(CHECK_SECRETS), "POSTGRES_PASSWORD"], capture_output=True,
                           text=True, env={**isolated_env(), "POSTGRES_PASSWORD": " "})
    assert blank.returncode == 1 and "POSTGRES_PASSWORD is empty" in blank.stderr


def test_model_server_gets_the_read_only_account_not_the_admin():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    model_server_env = " ".join(services["model-server"]["environment"].values())
    assert "ADMIN" not in model_server_env and "MLFLOW_READER_PASSWORD" in model_server_env
    assert "reader-account" in services["model-server"]["depends_on"]


READER_ACCOUNT = ROOT / "deploy" / "reader_account.py"


def reader_account(servers: Servers, username: str, password: str) -> str:
    """compose.yaml's reader-account service, run here against the test's tracking server."""
    service = yaml.safe_load(COMPOSE.read_text())["services"]["reader-account"]
    assert service["command"] == ["python", "/opt/deploy/reader_account.py"]
    env = service_env(service, {"MLFLOW_ADMIN_PASSWORD": servers.team_credentials["MLFLOW_TRACKING_PASSWORD"],
                                "MLFLOW_READER_USERNAME": username, "MLFLOW_READER_PASSWORD": password})
    env["MLFLOW_TRACKING_URI"] = servers.team.url  # http://tracking:5000 inside compose
    result = subprocess.run([sys.executable, str(READER_ACCOUNT)], env={**isolated_env(), **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


class Api:
    """The tracking server's REST API as one user (None: anonymous)."""

    def __init__(self, url: str, auth: tuple[str, str] | None):
        import requests

        self.url, self.session = url, requests.Session()
        self.session.auth = auth

    def call(self, method: str, route: str, **kwargs):
        return self.session.request(method, f"{self.url}/api/2.0/{route}", timeout=60, **kwargs)

    def ok(self, method: str, route: str, **kwargs) -> dict:
        response = self.call(method, route, **kwargs)
        assert response.status_code == 200, f"{method} {route}: {response.status_code} {response.text[:500]}"
        return response.json() if response.content else {}


def owned_objects(owner: Api, tag: str) -> dict[str, str]:
    """An experiment, a run with an artifact and a registered model, created by `owner`."""
    experiment = owner.ok("POST", "mlflow/experiments/create", json={"name": f"permissions-{tag}"})["experiment_id"]
    run = owner.ok("POST", "mlflow/runs/create", json={"experiment_id": experiment})["run"]["info"]
    artifacts = run["artifact_uri"].removeprefix("mlflow-artifacts:/").lstrip("/")
    owner.ok("PUT", f"mlflow-artifacts/artifacts/{artifacts}/note.txt", data=b"owner's note")
    owner.ok("POST", "mlflow/registered-models/create", json={"name": f"permissions-{tag}"})
    return {"experiment": experiment, "run": run["run_id"], "artifacts": artifacts, "model": f"permissions-{tag}"}


def attempts(objects: dict[str, str]) -> dict[tuple[str, str], tuple[str, str, dict]]:
    """(resource, action) -> one REST call doing it on `objects`."""
    experiment, run, artifacts, model = (objects[k] for k in ("experiment", "run", "artifacts", "model"))
    return {
        ("experiment", "read"): ("GET", "mlflow/experiments/get", {"params": {"experiment_id": experiment}}),
        ("experiment", "write"): ("POST", "mlflow/experiments/set-experiment-tag",
                                  {"json": {"experiment_id": experiment, "key": "k", "value": "v"}}),
        ("run", "read"): ("GET", "mlflow/runs/get", {"params": {"run_id": run}}),
        ("run", "write"): ("POST", "mlflow/runs/log-metric",
                           {"json": {"run_id": run, "key": "m", "value": 1.0, "timestamp": 0, "step": 0}}),
        ("artifact", "read"): ("GET", f"mlflow-artifacts/artifacts/{artifacts}/note.txt", {}),
        ("artifact", "write"): ("PUT", f"mlflow-artifacts/artifacts/{artifacts}/other.txt", {"data": b"x"}),
        ("model", "read"): ("GET", "mlflow/registered-models/get", {"params": {"name": model}}),
        ("model", "write"): ("PATCH", "mlflow/registered-models/update", {"json": {"name": model, "description": "d"}}),
        # Deletions last, the run and artifact before their experiment.
        ("artifact", "delete"): ("DELETE", f"mlflow-artifacts/artifacts/{artifacts}/note.txt", {}),
        ("run", "delete"): ("POST", "mlflow/runs/delete", {"json": {"run_id": run}}),
        ("model", "delete"): ("DELETE", "mlflow/registered-models/delete", {"json": {"name": model}}),
        ("experiment", "delete"): ("POST", "mlflow/experiments/delete", {"json": {"experiment_id": experiment}}),
    }


def test_permissions_of_anonymous_reader_owner_and_admin(servers):
    """Each kind of user against each kind of object the owner created, on the real server with
    PostgreSQL: anonymous is refused everything (401); the model server's read-only account reads
    and is refused every change and deletion (403); the owner and the admin may do all."""
    admin = Api(servers.team.url, (servers.team_credentials["MLFLOW_TRACKING_USERNAME"],
                                   servers.team_credentials["MLFLOW_TRACKING_PASSWORD"]))
    owner_password, reader_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    admin.ok("POST", "mlflow/users/create", json={"username": "owner", "password": owner_password})
    assert "created" in reader_account(servers, "model-server", "first-" + reader_password)
    assert "updated" in reader_account(servers, "model-server", reader_password)  # each start resets it
    owner = Api(servers.team.url, ("owner", owner_password))
    reader = Api(servers.team.url, ("model-server", reader_password))
    anonymous = Api(servers.team.url, None)
    assert reader.call("GET", "mlflow/experiments/search", params={"max_results": 1}).status_code == 200
    assert Api(servers.team.url, ("model-server", "first-" + reader_password)).call(
        "GET", "mlflow/experiments/search", params={"max_results": 1}).status_code == 401

    outcome, expected = {}, {}
    for user, api in (("anonymous", anonymous), ("reader", reader)):
        objects = owned_objects(owner, user)
        for (resource, action), (method, route, kwargs) in attempts(objects).items():
            outcome[user, resource, action] = api.call(method, route, **kwargs).status_code
            expected[user, resource, action] = 401 if user == "anonymous" else 200 if action == "read" else 403
        # What they were refused is still there, unchanged.
        assert owner.call("GET", f"mlflow-artifacts/artifacts/{objects['artifacts']}/note.txt").content == b"owner's note"
        assert owner.ok("GET", "mlflow/registered-models/get", params={"name": objects["model"]})[
            "registered_model"].get("description", "") == ""
        assert owner.ok("GET", "mlflow/experiments/get", params={"experiment_id": objects["experiment"]})[
            "experiment"]["lifecycle_stage"] == "active"
    for user, api in (("owner", owner), ("admin", admin)):
        for (resource, action), (method, route, kwargs) in attempts(owned_objects(owner, user)).items():
            outcome[user, resource, action] = api.call(method, route, **kwargs).status_code
            expected[user, resource, action] = 200
    # MLflow lets every user create objects of their own: so can the reader (docs/serving.md).
    assert reader.call("POST", "mlflow/experiments/create", json={"name": "reader-own"}).status_code == 200
    assert len(outcome) == 4 * 4 * 3
    assert {key: status for key, status in outcome.items() if status != expected[key]} == {}


def test_wrong_password_flood_is_refused_without_locking_out_verified_clients(servers):
    """deploy/auth_throttle.py on the real server: once the password-check budget is spent, wrong
    passwords get 429 with Retry-After, while a client verified before keeps getting 200.
    (How much a flood slows valid clients is measured by benchmarks/auth_flood.py.)"""
    import requests

    username = servers.team_credentials["MLFLOW_TRACKING_USERNAME"]
    search = f"{servers.team.url}/api/2.0/mlflow/experiments/search?max_results=1"
    valid = requests.Session()
    valid.auth = (username, servers.team_credentials["MLFLOW_TRACKING_PASSWORD"])
    assert valid.get(search, timeout=60).status_code == 200
    statuses, retry_after = [], set()
    with requests.Session() as guesser:
        for attempt in range(200):  # bounded; 4 workers x a burst of 5 checks are spent long before
            guesser.auth = (username, f"guess-{attempt}")
            response = guesser.get(search, timeout=60)
            statuses.append(response.status_code)
            if response.status_code == 429:
                retry_after.add(response.headers["Retry-After"])
                if statuses.count(429) >= 5:
                    break
            assert valid.get(search, timeout=60).status_code == 200
    assert set(statuses) == {401, 429} and statuses.count(429) == 5, statuses
    assert all(value.isdigit() and int(value) >= 1 for value in retry_after)
