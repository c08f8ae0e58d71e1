"""Abuse of the serving port: malformed, oversized and abandoned requests on every route, and
what the server's memory does meanwhile.

    uv run python benchmarks/serving_abuse.py [--model-uri URI] [--rounds 200]

Starts `python -m mnist_lifecycle.serving` on loopback (one worker), then runs `--rounds` rounds,
each: every malformed request of tests/test_serving.py against /predict (61 cases) and
/invocations (75), a valid /predict and /invocations, the text routes, and two clients that leave
mid-body. Every 50 rounds one 64 MiB body goes to /invocations. Counts answers by status, 5xx
above all, and prints the server's resident memory (its whole process tree) before and after as
JSON. The model is `models:/mnist-digits@champion` of the project's tracking store unless
--model-uri says otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mnist_lifecycle.serving import example_digit, resolve_tracking_uri  # noqa: E402
from tests.servers import model_server  # noqa: E402
from tests.test_serving import bad_requests, invocation_requests  # noqa: E402


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        status = Path(f"/proc/{current}/status").read_text()
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            pending += [int(child) for child in children]
    return total


def leave_mid_body(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100000\r\n\r\n" + b'{"image": [0, 0')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/mnist-digits@champion")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    tracking_uri = resolve_tracking_uri()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri or ""}
    statuses: collections.Counter = collections.Counter()
    cases = [("/predict", case) for case in bad_requests()] + [("/invocations", case) for case in invocation_requests()
                                                                if len(case[1]) < 2**20]
    huge = next(case for case in invocation_requests() if case[0] == "64 MiB body")
    digit = example_digit()
    with tempfile.TemporaryDirectory() as directory:
        server = model_server(Path(directory), env, Path(directory) / "server.log", args.model_uri)
        try:
            server.wait_ready()
            before = rss_bytes(server.process.pid)
            with requests.Session() as session:
                for round_ in range(args.rounds):
                    for path, (_, body, content_type, _, _) in cases:
                        headers = {"Content-Type": content_type} if content_type else {}
                        statuses[session.post(server.url + path, data=body, headers=headers).status_code] += 1
                    statuses[session.post(server.url + "/predict", json={"image": digit}).status_code] += 1
                    statuses[session.post(server.url + "/invocations", json={"inputs": [digit]}).status_code] += 1
                    for path in ("/ping", "/health", "/version"):
                        statuses[session.get(server.url + path).status_code] += 1
                    for _ in range(2):
                        leave_mid_body(server.url)
                    if round_ % 50 == 0:
                        statuses[session.post(server.url + "/invocations", data=huge[1],
                                              headers={"Content-Type": "application/json"}).status_code] += 1
            after = rss_bytes(server.process.pid)
            log = server.log.read_text(errors="replace")
        finally:
            server.stop()
    result = {
        "requests": sum(statuses.values()), "abandoned_bodies": 2 * args.rounds,
        "by_status": dict(sorted(statuses.items())), "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "rss_mib_before": round(before / 2**20, 1), "rss_mib_after": round(after / 2**20, 1),
        "log_lines": len(log.splitlines()), "tracebacks_in_log": log.count("Traceback"),
    }
    print(json.dumps(result, indent=2))
    return 0 if result["server_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
