"""Wrong-password flood: how much a client guessing passwords slows down the valid clients.

    uv run python benchmarks/auth_flood.py [--flooders 8] [--seconds 20] [--valid 200]

Starts the team deployment's tracking server as tests/test_tracking_server.py does (compose.yaml's
`tracking` command and environment, basic auth, a throwaway PostgreSQL cluster, loopback only),
then times `--valid` authenticated requests (GET experiments/search, one client on a keep-alive
connection) alone, and again while `--flooders` threads send requests with a wrong password for
the admin account as fast as the server answers them. The flood stops by itself after `--seconds`
or `--max-flood` requests, whichever comes first. Prints a JSON summary: valid latencies (median,
p95) alone and under the flood, their ratio, and the flood's request rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import postgres_cluster  # noqa: E402
from tests.test_tracking_server import team_server  # noqa: E402

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def timed_requests(session: requests.Session, url: str, count: int) -> list[float]:
    """Seconds per request of `count` authenticated searches on the session's keep-alive connection,
    as an MLflow client makes them (all must be 200)."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = session.get(url + SEARCH, timeout=120)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text[:300]
    return latencies


def first_login(url: str, auth: tuple[str, str]) -> tuple[float, int]:
    """A new client's first request, retrying 429 after Retry-After as MLflow's client does:
    (seconds until answered 200, 429s received)."""
    started, refusals = time.perf_counter(), 0
    with requests.Session() as session:
        session.auth = auth
        while (response := session.get(url + SEARCH, timeout=120)).status_code == 429:
            refusals += 1
            time.sleep(float(response.headers.get("Retry-After", 1)))
        assert response.status_code == 200, response.text[:300]
    return time.perf_counter() - started, refusals


refused = [0]  # 429 answers: the password-check budget spent (auth_throttle.py)


def flood(url: str, username: str, stop: threading.Event, counts: list[int], limit: int) -> None:
    with requests.Session() as session:
        while not stop.is_set() and sum(counts) < limit:
            session.auth = (username, f"wrong-{random.random()}")  # a guesser varies the password
            response = session.get(url + SEARCH, timeout=120)
            assert response.status_code in (401, 429), response.status_code
            counts.append(1)
            refused[0] += response.status_code == 429


def summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {"median_ms": round(statistics.median(ordered) * 1000, 1),
            "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1), "requests": len(ordered)}


def measure(url: str, auth: tuple[str, str], flooders: int, seconds: float, valid: int, max_flood: int) -> dict:
    session = requests.Session()
    session.auth = auth
    timed_requests(session, url, 5)  # warm: the password check is cached after the first request
    alone = timed_requests(session, url, valid)
    stop, counts = threading.Event(), []
    threads = [threading.Thread(target=flood, args=(url, auth[0], stop, counts, max_flood), daemon=True)
               for _ in range(flooders)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(1)  # the flood at full rate before the valid client starts
    under_flood = []
    deadline = started + seconds
    while time.monotonic() < deadline and len(under_flood) < valid:
        under_flood += timed_requests(session, url, 1)
    login_seconds, login_refusals = first_login(url, auth)
    stop.set()
    for thread in threads:
        thread.join(timeout=150)
    elapsed = time.monotonic() - started
    result = {"alone": summary(alone), "under_flood": summary(under_flood),
              "flood": {"clients": flooders, "requests": len(counts), "per_second": round(len(counts) / elapsed, 1),
                        "refused_429": refused[0]}}
    result["new_client_first_request"] = {"seconds": round(login_seconds, 2), "refused_429": login_refusals}
    result["slowdown_median"] = round(result["under_flood"]["median_ms"] / result["alone"]["median_ms"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flooders", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--valid", type=int, default=200)
    parser.add_argument("--max-flood", type=int, default=20_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory, postgres_cluster() as postgres, contextlib.ExitStack() as stack:
        server, _, credentials = team_server(Path(directory) / "team", postgres)
        stack.callback(server.stop)
        server.wait_ready()
        auth = (credentials["MLFLOW_TRACKING_USERNAME"], credentials["MLFLOW_TRACKING_PASSWORD"])
        result = measure(server.url, auth, args.flooders, args.seconds, args.valid, args.max_flood)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
