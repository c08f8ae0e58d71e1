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
