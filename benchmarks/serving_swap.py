"""Hot swap benchmark: /predict latency while @champion moves, next to steady state.

    MNIST_SOURCE_DIR=../shared/data/mnist uv run python benchmarks/serving_swap.py [--rounds 3] [--seconds 5]

Builds a throwaway tracking store with two small real models (versions 1 and 2 of mnist-digits,
trained on 4,000 MNIST images each), starts the model server on `models:/mnist-digits@champion`
with `--poll-seconds 1` and `mlflow models serve` on the same alias, then per round: 8 clients
send single images for `--seconds` with nothing moving (steady), then for `--seconds` again while
the alias is moved to the other version half a second in (the window holds the poll, the load
of the new version in the server's background thread, and the swap). Prints p50/p99 of both
windows, and /predict's throughput against MLflow's /invocations at 8 clients (goal: >= 3x).
Goal (issue 13): p99 during the swap <= 2x steady state.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving import BIN, _load, http_request, load  # noqa: E402
from tests.servers import Server, free_port  # noqa: E402


def build_store(directory: Path) -> str:
    """Two real versions of mnist-digits in a new sqlite store, @champion on version 1."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mnist_lifecycle import data
    from tests.test_serving import train_and_register

    source = Path(os.environ.get("MNIST_SOURCE_DIR", ROOT / "data" / "mnist"))
    images, labels = (data.read_idx(source / f"{idx.name}.gz").copy() for idx in data.IDX_FILES[:2])
    tracking_uri = f"sqlite:///{directory / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_experiment("serving-swap-benchmark")
    for seed in (0, 1):
        train_and_register(images[seed * 4000:(seed + 1) * 4000], labels[seed * 4000:(seed + 1) * 4000], seed, {})
    MlflowClient().set_registered_model_alias("mnist-digits", "champion", "1")
    return tracking_uri


def served_version(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=10) as response:
        return orjson.loads(response.read())["version"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per window")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from mlflow.tracking import MlflowClient

    from mnist_lifecycle import data

    workdir = tempfile.TemporaryDirectory()
    tracking_uri = build_store(Path(workdir.name))
    source = Path(os.environ.get("MNIST_SOURCE_DIR", ROOT / "data" / "mnist"))
    test_images = data.read_idx(source / f"{data.IDX_FILES[2].name}.gz")[:200]
    predict = [orjson.dumps({"image": image}, option=orjson.OPT_SERIALIZE_NUMPY) for image in test_images]
    invocation = [orjson.dumps({"inputs": image[None].astype(np.float32)}, option=orjson.OPT_SERIALIZE_NUMPY)
                  for image in test_images]
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking_uri}
    ports = {"serving": free_port(), "mlflow": free_port()}
    servers = {
        "serving": Server([str(BIN / "python"), "-m", "mnist_lifecycle.serving", "--poll-seconds", "1",
                           "--port", str(ports["serving"])], env, Path(workdir.name) / "serving.log",
                          f"http://127.0.0.1:{ports['serving']}", "/ping", cwd=ROOT),
        "mlflow": Server([str(BIN / "mlflow"), "models", "serve", "-m", "models:/mnist-digits@champion",
                          "--env-manager", "local", "-h", "127.0.0.1", "-p", str(ports["mlflow"])], env,
                         Path(workdir.name) / "mlflow.log", f"http://127.0.0.1:{ports['mlflow']}", "/ping", cwd=ROOT),
    }
    port = ports["serving"]
    requests = [http_request(port, "/predict", body) for body in predict]
    client = MlflowClient(tracking_uri=tracking_uri)
    rows = {"steady": [], "during a swap": [], "/predict req/s": [], "/invocations req/s": []}
    try:
        for server in servers.values():
            server.wait_ready(timeout=300)
        for round_number in range(args.rounds):
            steady = load(port, servers["serving"].process.pid, requests, 8, args.seconds)
            target = "2" if served_version(port) == "1" else "1"
            mover = threading.Timer(0.5, client.set_registered_model_alias, ("mnist-digits", "champion", target))
            mover.start()
            latencies, elapsed = asyncio.run(_load(port, requests, 8, args.seconds, 1_000_000))
            mover.join()
            swapped = served_version(port) == target
            ms = np.array(latencies) * 1e3
            swap = {"requests": len(ms), "req_per_s": len(ms) / elapsed,
                    "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
            theirs = load(ports["mlflow"], servers["mlflow"].process.pid,
                          [http_request(ports["mlflow"], "/invocations", body) for body in invocation], 8, args.seconds)
            print(f"round {round_number + 1}: steady p50 {steady['p50_ms']:.2f} p99 {steady['p99_ms']:.2f} ms "
                  f"({steady['req_per_s']:.0f} req/s); swap to version {target} "
                  f"{'done' if swapped else 'NOT DONE'} within the window: p50 {swap['p50_ms']:.2f} "
                  f"p99 {swap['p99_ms']:.2f} ms ({swap['req_per_s']:.0f} req/s); mlflow /invocations "
                  f"{theirs['req_per_s']:.0f} req/s (load average {os.getloadavg()[0]:.1f})", flush=True)
            if not swapped:
                raise SystemExit("the swap did not complete within the window: lengthen --seconds")
            rows["steady"].append(steady)
            rows["during a swap"].append(swap)
            rows["/predict req/s"].append(steady["req_per_s"])
            rows["/invocations req/s"].append(theirs["req_per_s"])
        swaps = [line for line in (Path(workdir.name) / "serving.log").read_text().splitlines() if "now serving" in line]
        print("\n".join(swaps))
    finally:
        for server in servers.values():
            server.stop()
        workdir.cleanup()

    print(f"\nmedians of {args.rounds} rounds, 8 clients, single images, {args.seconds:g} s windows:")
    for name in ("steady", "during a swap"):
        p50, p99 = (float(np.median([r[key] for r in rows[name]])) for key in ("p50_ms", "p99_ms"))
        print(f"  /predict {name:14s} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms")
    ratio_p99 = np.median([r["p99_ms"] for r in rows["during a swap"]]) / np.median([r["p99_ms"] for r in rows["steady"]])
    ratio = np.median(rows["/predict req/s"]) / np.median(rows["/invocations req/s"])
    print(f"  {'met   ' if ratio_p99 <= 2 else 'MISSED'} p99 during a swap <= 2x steady: {ratio_p99:.2f}x")
    print(f"  {'met   ' if ratio >= 3 else 'MISSED'} /predict >= 3x mlflow models serve's /invocations (8 clients): "
          f"{ratio:.1f}x ({np.median(rows['/predict req/s']):.0f} vs {np.median(rows['/invocations req/s']):.0f} req/s)")


if __name__ == "__main__":
    main()
