"""Where the test suite's CPU goes: every process's CPU time, summed by what the process is.

    MNIST_SOURCE_DIR=../shared/data/mnist uv run python benchmarks/suite_cpu.py [PYTEST ARGS...]
    ... benchmarks/suite_cpu.py $(cat benchmarks/suite_of_34f80cc.txt)     # the 54 tests of issue 12

Runs `pytest -n auto -q -p no:cacheprovider [ARGS]` and reads /proc every 0.1 s meanwhile: each
process's own user + system time (the last value seen before it exits; processes shorter than a
sample are missed, and whatever ran before the suite started is not counted). Prints the wall time,
the CPU by kind of process (stage runner, notebook kernel, MLflow server workers, ...) and the
ratio CPU / wall, which says how close the suite is to keeping both cores busy: on 2 cores no
schedule runs it in less than CPU / 2. Writes benchmarks/results/suite_cpu.json; figures are written
down in benchmarks/README.md ("Test suite wall time").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")

# First match wins: (kind, pattern in the command line).
KINDS = [
    ("notebook kernel", r"ipykernel"),
    ("stage runner", r"mnist_lifecycle\.stage"),
    ("sweep", r"mnist_lifecycle\.sweep"),
    ("model server (mnist_lifecycle.serving)", r"mnist_lifecycle\.serving"),
    ("mlflow server", r"mlflow server|mlflow\.server|uvicorn .*mlflow\.server|gunicorn"),
    ("mlflow models serve", r"scoring_server|mlflow models serve"),
    # (pytest's temporary directory is in many commands' arguments: the interpreter's own name only)
    ("pytest and its workers (in-process tests)", r"exec\(eval\(sys\.stdin|bin/pytest |-m pytest "),
    ("dvc", r"\bdvc\b"),
    ("other commands of the tests (registry, writers, ...)", r"python"),
    ("postgres", r"postgres"),
    ("seaweedfs", r"\bweed\b"),
]


def sample(seen: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                raw = Path(f"/proc/{pid}/stat").read_text()
                fields = raw.rsplit(")", 1)[1].split()
                key = (int(pid), fields[19])  # pid and start time: pids are reused
                cpu = (int(fields[11]) + int(fields[12])) / TICK
                if key not in seen:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    seen[key] = {"ppid": int(fields[1]), "command": command, "cpu": cpu}
                seen[key]["cpu"] = max(seen[key]["cpu"], cpu)
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
        stop.wait(0.1)


def kind(process: dict, by_pid: dict) -> str:
    command = process["command"]
    if "multiprocessing" in command:  # a server's worker: the kind of its parent
        parent = by_pid.get(process["ppid"])
        return kind(parent, by_pid) if parent else "other"
    return next((name for name, pattern in KINDS if re.search(pattern, command)), "other")


def main() -> None:
    seen: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(seen, stop), daemon=True)
    sampler.start()
    time.sleep(0.5)
    before = set(seen.copy())  # this machine's own processes, not counted (a copy: the sampler adds meanwhile)
    started = time.time()
    status = subprocess.call([sys.executable, "-m", "pytest", "-n", "auto", "-q", "-p", "no:cacheprovider",
                              *sys.argv[1:]], cwd=ROOT)
    wall = time.time() - started
    stop.set()
    sampler.join()
    me = os.getpid()
    processes = {key: p for key, p in seen.items() if key not in before and key[0] != me}
    by_pid = {key[0]: p for key, p in processes.items()}
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for process in processes.values():
        row = totals[kind(process, by_pid)]
        row[0] += process["cpu"]  # started during the suite: all of its CPU is the suite's
        row[1] += 1
    cpu = sum(row[0] for row in totals.values())
    print(f"\npytest exited {status}; wall {wall:.0f} s, CPU {cpu:.0f} s (CPU / wall {cpu / wall:.2f}, "
          f"{os.cpu_count()} cores)")
    print(f"{'CPU s':>7} {'share':>6} {'procs':>5}  kind")
    for name, (seconds, count) in sorted(totals.items(), key=lambda item: -item[1][0]):
        print(f"{seconds:7.1f} {seconds / cpu:6.0%} {count:5d}  {name}")
    out = ROOT / "benchmarks" / "results" / "suite_cpu.json"
    out.write_text(json.dumps({"args": sys.argv[1:], "status": status, "wall_seconds": round(wall, 1),
                               "cpu_seconds": round(cpu, 1), "cores": os.cpu_count(),
                               "by_kind": {name: {"cpu_seconds": round(s, 1), "processes": n}
                                           for name, (s, n) in totals.items()}}, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")
    sys.exit(status)


if __name__ == "__main__":
    main()
