"""Serving benchmark: /predict against MLflow's /invocations on the same model, side by side.

    uv run python benchmarks/serving.py [--model-uri URI] [--seconds 5] [--quick]

Starts real servers on loopback (`mlflow models serve --env-manager local`, then
`python -m mnist_lifecycle.serving` with several worker/thread counts), loads them from a separate
process with an asyncio client on keep-alive connections sending real MNIST test images, and
prints one table. The model is `models:/mnist-digits@champion` of the project's tracking store
unless --model-uri says otherwise; run the pipeline first. `--quick` measures only MLflow's server
and the default configuration. Targets (issue 3), single-image requests:
- /predict p50 <= 3 ms and p99 <= 10 ms (one client);
- >= 400 req/s with concurrent clients, and >= 3x MLflow's /invocations at the same concurrency;
- batches of 256 images: >= half of the model's raw in-process throughput.

Results of a run on the 2-core machine (client and servers on the same cores, so compare rows of
one run): benchmarks/README.md and docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from tests.servers import Server, free_port  # noqa: E402


def http_request(port: int, path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _client(port: int, requests: list[bytes], offset: int, deadline: float,
                  latencies: list[float], max_requests: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    index = offset
    try:
        while time.perf_counter() < deadline and len(latencies) < max_requests:
            started = time.perf_counter()
            writer.write(requests[index % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{head.decode()}\n{body[:500].decode()}")
            index += 1
    finally:
        writer.close()


async def _load(port: int, requests: list[bytes], concurrency: int, seconds: float,
                max_requests: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(*(_client(port, requests, i * 7, started + seconds, latencies, max_requests)
                           for i in range(concurrency)))
    return latencies, time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (uvicorn workers), from /proc."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    tree, total, frontier = {pid}, 0.0, [pid]
    while frontier:
        parent = frontier.pop()
        total += stats.get(parent, (0, 0.0))[1]
        children = [child for child, (ppid, _) in stats.items() if ppid == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return total


def load(port: int, pid: int, requests: list[bytes], concurrency: int, seconds: float,
         images_per_request: int = 1, max_requests: int = 100_000) -> dict:
    """Closed loop: `concurrency` connections, each sending its next request when answered.

    Also the server's CPU time per request: unlike the wall clock, it hardly depends on what
    else the machine runs, so it measures the serving code's own cost.
    """
    asyncio.run(_load(port, requests, concurrency, min(1.0, seconds), 50 * concurrency))  # warm-up
    cpu_before = cpu_seconds(pid)
    latencies, elapsed = asyncio.run(_load(port, requests, concurrency, seconds, max_requests))
    cpu = cpu_seconds(pid) - cpu_before
    ms = np.array(latencies) * 1e3
    return {"requests": len(ms), "req_per_s": len(ms) / elapsed,
            "images_per_s": len(ms) * images_per_request / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "cpu_ms_per_request": cpu / len(ms) * 1e3}


def raw_model(model_uri: str, images: np.ndarray, seconds: float) -> dict:
    """The served module in this process: batch 1 (one torch thread, as in the server), and
    batch 256 images/s with one and two threads.

    Also times the alternatives to MLflow's pt2 loading: the same graph without its input checks,
    and the eager DigitClassifier with the same weights.
    """
    import mlflow.pyfunc
    import mlflow.pytorch
    import torch

    from mnist_lifecycle import model as model_module

    torch.set_num_threads(1)
    pyfunc_model = mlflow.pyfunc.load_model(model_uri)
    served = pyfunc_model.get_raw_model()
    unchecked = mlflow.pytorch.load_model(model_uri)
    unchecked.validate_inputs = False  # the graph's pre-hook that checks inputs against the export
    # The classifier the train run's parameters describe (runs before `hidden` and `last_block_convs`
    # existed have neither: the defaults). The temperature is a constant of the exported graph, not in
    # its state dict; MLmodel records it (models logged before calibration have none: 1).
    logged = mlflow.get_run(pyfunc_model.metadata.run_id).data.params
    shape = {name: type(default)(logged.get(name, default))
             for name, default in (("width", 16), ("dropout", 0.0), ("hidden", 0), ("last_block_convs", 1))}
    temperature = (pyfunc_model.metadata.metadata or {}).get("temperature", 1.0)
    eager = model_module.ProbabilityModel(model_module.DigitClassifier(**shape), temperature).eval()
    eager.load_state_dict({**served.state_dict(), "temperature": torch.tensor(temperature)})
    one = torch.from_numpy(images[:1].astype(np.float32))
    batch = torch.from_numpy(images[:256].astype(np.float32))
    with torch.inference_mode():
        assert torch.allclose(eager(batch), served(batch), atol=1e-5)

    def timing(function, argument, repeat: int) -> np.ndarray:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            function(argument)
            times.append(time.perf_counter() - started)
        return np.array(times) * 1e3

    results = {}
    with torch.inference_mode():
        candidates = {"pt2 (mlflow.pytorch.load_model)": served, "pt2, validate_inputs=False": unchecked,
                      "eager DigitClassifier, same weights": eager}
        pyfunc_ms = []
        for _ in range(20):  # interleaved, so that load from other processes hits all alike
            for name, module in candidates.items():
                results.setdefault(name, []).extend(timing(module, one, 25))
            pyfunc_ms.extend(timing(pyfunc_model.predict, images[:1].astype(np.float32), 25))
        report = {name: float(np.median(ms)) for name, ms in results.items()}
        report["pyfunc.predict (what /invocations calls)"] = float(np.median(pyfunc_ms))
        throughput = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            batch_ms = timing(served, batch, max(5, int(seconds / 0.05)))
            throughput[threads] = 256 / (np.median(batch_ms) / 1e3)
    torch.set_num_threads(1)
    return {"batch1_p50_ms": report, "batch256_images_per_s": throughput}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default="models:/mnist-digits@champion")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all servers; medians shown")
    parser.add_argument("--quick", action="store_true", help="MLflow's server and the default one only")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from mnist_lifecycle import config, data

    os.chdir(ROOT)
    tracking_uri = config.use_default_tracking_uri(ROOT)
    images, _ = data.load_split(ROOT / "data" / "prepared", "test")
    print(f"model {args.model_uri} (tracking {tracking_uri}); {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    raw = raw_model(args.model_uri, images, args.seconds)
    print("\nforward pass in-process, batch 1, p50 ms (1 torch thread):")
    for name, value in raw["batch1_p50_ms"].items():
        print(f"  {name:42s} {value:6.3f}")
    for threads, value in raw["batch256_images_per_s"].items():
        print(f"batch 256 in-process, {threads} torch thread(s): {value:.0f} images/s")

    single = [orjson.dumps({"image": image}, option=orjson.OPT_SERIALIZE_NUMPY) for image in images[:200]]
    invocation = [orjson.dumps({"inputs": image[None].astype(np.float32)},
                               option=orjson.OPT_SERIALIZE_NUMPY) for image in images[:200]]
    batches = [orjson.dumps({"image": images[i : i + 256]}, option=orjson.OPT_SERIALIZE_NUMPY)
               for i in range(0, 256 * 4, 256)]
    scenarios = {  # name: (route, bodies, clients, images per request)
        "/invocations": {"1 image, 1 client": ("/invocations", invocation, 1, 1),
                         "1 image, 8 clients": ("/invocations", invocation, 8, 1)},
        "/predict": {"1 image, 1 client": ("/predict", single, 1, 1),
                     "1 image, 8 clients": ("/predict", single, 8, 1),
                     "256 images, 2 clients": ("/predict", batches, 2, 256)},
    }
    mlflow_serve = [str(BIN / "mlflow"), "models", "serve", "-m", args.model_uri, "--env-manager",
                    "local", "-h", "127.0.0.1", "-p"]
    servers = {"mlflow models serve": (mlflow_serve, {}, "/invocations")}
    if not args.quick:
        # MLflow's server leaves torch at one thread per core; the same with one thread.
        servers["mlflow models serve, OMP_NUM_THREADS=1"] = (mlflow_serve, {"OMP_NUM_THREADS": "1"}, "/invocations")
    for workers, threads in [(1, 1)] if args.quick else [(1, 1), (1, 2), (2, 1), (2, 2)]:
        command = [str(BIN / "python"), "-m", "mnist_lifecycle.serving", "--model-uri", args.model_uri,
                   "--workers", str(workers), "--threads", str(threads), "--port"]
        servers[f"serving -w {workers} --threads {threads}"] = (command, {}, "/predict")

    # All servers up at once, measured in turns, several rounds: whatever else loads the machine
    # hits them all alike, and the medians over rounds are compared.
    running = {}
    logs = tempfile.TemporaryDirectory()
    try:
        for name, (command, env, route) in servers.items():
            port = free_port()
            # `mlflow models serve` runs the `uvicorn` it finds on PATH.
            env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
            server = Server([*command, str(port)], env, Path(logs.name) / f"{port}.log",
                            f"http://127.0.0.1:{port}", "/ping", cwd=ROOT)
            running[name] = (port, server, route)
        for port, server, route in running.values():
            server.wait_ready(timeout=300)
        results: dict[tuple[str, str], list[dict]] = {}
        for round_number in range(args.rounds):
            print(f"round {round_number + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})", flush=True)
            for name, (port, server, route) in running.items():
                for scenario, (path, bodies, clients, per_request) in scenarios[route].items():
                    requests = [http_request(port, path, body) for body in bodies]
                    results.setdefault((name, scenario), []).append(
                        load(port, server.process.pid, requests, clients, args.seconds, per_request))
    finally:
        for port, server, route in running.values():
            server.stop()
        logs.cleanup()

    summary = {key: {metric: float(np.median([r[metric] for r in rounds])) for metric in rounds[0]}
               for key, rounds in results.items()}
    print(f"\n{'server':40s} {'requests':22s} {'req/s':>7s} {'images/s':>9s} {'p50 ms':>7s} "
          f"{'p99 ms':>7s} {'CPU ms/req':>10s}")
    for (name, scenario), row in summary.items():
        print(f"{name:40s} {scenario:22s} {row['req_per_s']:7.0f} {row['images_per_s']:9.0f} "
              f"{row['p50_ms']:7.2f} {row['p99_ms']:7.2f} {row['cpu_ms_per_request']:10.2f}")

    ours = {scenario: summary["serving -w 1 --threads 1", scenario] for scenario in scenarios["/predict"]}
    theirs = {scenario: summary["mlflow models serve", scenario] for scenario in scenarios["/invocations"]}
    one, many, batch = ours["1 image, 1 client"], ours["1 image, 8 clients"], ours["256 images, 2 clients"]
    raw1 = raw["batch256_images_per_s"][1]
    checks = [
        ("/predict p50 <= 3 ms (1 client)", one["p50_ms"] <= 3, f"{one['p50_ms']:.2f} ms"),
        ("/predict p99 <= 10 ms (1 client)", one["p99_ms"] <= 10, f"{one['p99_ms']:.2f} ms"),
        (">= 400 req/s (8 clients)", many["req_per_s"] >= 400, f"{many['req_per_s']:.0f} req/s"),
    ]
    for scenario in ("1 image, 1 client", "1 image, 8 clients"):
        ratio = ours[scenario]["req_per_s"] / theirs[scenario]["req_per_s"]
        checks.append((f">= 3x /invocations req/s ({scenario})", ratio >= 3, f"{ratio:.1f}x"))
    cpu_ratio = theirs["1 image, 8 clients"]["cpu_ms_per_request"] / many["cpu_ms_per_request"]
    checks.append((">= 3x less server CPU per request", cpu_ratio >= 3, f"{cpu_ratio:.1f}x"))
    checks.append(("256-image batches >= half of in-process", batch["images_per_s"] >= raw1 / 2,
                   f"{batch['images_per_s'] / raw1:.0%} of {raw1:.0f} images/s (1 thread)"))
    print("\ngoals (serving defaults: 1 worker, 1 torch thread; against mlflow models serve as it comes):")
    for goal, met, value in checks:
        print(f"  {'met   ' if met else 'MISSED'} {goal:42s} {value}")


if __name__ == "__main__":
    main()
